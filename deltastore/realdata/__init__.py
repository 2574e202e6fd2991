"""The real base model (SmolLM2-135M-Instruct from PyPI), task data, fine-tuning and task scoring.

Modules: `base` (fetch and convert the base), `tasks` (prepare and read task splits), `encoding`
(chat-template tokenization), `adamr` (the AdamR optimizer), `finetune` (training runs),
`evaluate` (task scores) and `cli` (the subcommands). Nothing heavy is imported here.
"""
