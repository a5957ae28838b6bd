"""`dialogue ...`: the command line, a surface over the dialogue service.

`main` parses arguments and turns errors into one line and an exit status; each command group
lives in a module of its own (`dialogues`, `messages`, `runs`, `io`, `models`, `serve`, `adapters`,
`train`). Commands import only the service, the document model, artifacts and `dialogue.terminal`
(tests/test_layout.py holds them to it), so every rule lives in the service, once.
"""
