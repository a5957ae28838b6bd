"""What the kernel process runs (as a script, under the kernel's own Python): ipykernel_launcher,
except that ipykernel's pipe for output from forked subprocesses (multiprocessing with fork)
listens on an IPC socket in the kernel's private directory instead of a random TCP port on
127.0.0.1, which any local user could connect to.

ipykernel has no setting for that pipe, so its two setup methods are replaced; if a future
ipykernel renames them, the patch is skipped and the kernel runs unchanged.

Its IOPub socket also queues more before it drops: ZeroMQ's default high-water mark (1000
messages) loses output, and sometimes the `status: idle` that ends a run, as soon as the app reads
a cell that prints many flushed lines more slowly than the kernel sends them (the app copes with
a lost idle, see kernel.IDLE_GRACE, but the output is gone). The queue is in this process, the
user's, not the app's. ipykernel has no setting for it either.

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


IOPUB_SNDHWM = 100_000  # messages (small stream chunks mostly: a flushed print is one each)
HWM_ENV = "DIALOGUE_KERNEL_IOPUB_HWM"  # the kernel_iopub_hwm setting, inherited from the app


def _raise_iopub_hwm():
    import zmq
    from ipykernel.kernelapp import IPKernelApp
    init_iopub = getattr(IPKernelApp, "init_iopub", None)
    if init_iopub is None:
        return

    hwm = int(os.environ.get(HWM_ENV) or IOPUB_SNDHWM)

    def init_iopub_with_hwm(self, context):
        # a context's default options apply to the sockets it creates: only while this one is
        context.setsockopt(zmq.SNDHWM, hwm)
        try:
            init_iopub(self, context)
        finally:
            context.sockopts.pop(zmq.SNDHWM, None)

    IPKernelApp.init_iopub = init_iopub_with_hwm


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
    try:
        _raise_iopub_hwm()
    except Exception:
        pass
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
