"""What the kernel process runs (as a script, under the kernel's own Python): ipykernel_launcher,
except that ipykernel's pipe for output from forked subprocesses (multiprocessing with fork)
listens on an IPC socket in the kernel's private directory instead of a random TCP port on
127.0.0.1, which any local user could connect to.

ipykernel has no setting for that pipe, so its two setup methods are replaced; if a future
ipykernel renames them, the patch is skipped and the kernel runs unchanged.

    python launcher.py -f CONNECTION_FILE [ipykernel options]
"""
import os
import sys


def _patch_pipe(private_dir):
    import zmq
    from ipykernel.iostream import IOPubThread
    from zmq.eventloop.zmqstream import ZMQStream
    if not (hasattr(IOPubThread, "_setup_pipe_in") and hasattr(IOPubThread, "_setup_pipe_out")):
        return
    addr = "ipc://" + os.path.join(private_dir, "iopub-pipe")

    def _setup_pipe_in(self):
        self._pipe_uuid = os.urandom(16)
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        pipe_in.bind(addr)
        self._pipe_in = ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)

    def _setup_pipe_out(self):
        ctx = zmq.Context()
        pipe_out = ctx.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect(addr)
        return ctx, pipe_out

    IOPubThread._setup_pipe_in = _setup_pipe_in
    IOPubThread._setup_pipe_out = _setup_pipe_out


def main():
    # Python put this file's directory first on sys.path: the user's imports must not find the
    # other files here. (ipykernel_launcher likewise drops the "" of `python -m`; IPython puts
    # the working directory back.)
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] and os.path.abspath(sys.path[0]) == here:
        del sys.path[0]
    try:
        _patch_pipe(os.path.dirname(os.path.abspath(sys.argv[sys.argv.index("-f") + 1])))
    except Exception:
        pass
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
