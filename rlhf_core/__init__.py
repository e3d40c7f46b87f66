"""The library: plain torch/transformers code with no orchestration imports (no Prefect, MLflow,
DVC or Great Expectations; a test enforces it).

    data/        files in, tensors out: formats and sources (shapes, columns), encoding (chat
                 templates, masks, splits), batching, the tokenizer, the tokenized splits on disk
    ops/         pure maths on tensors: losses, log-probs, GAE, KL, masked statistics
    training/    what every loop shares: the RunContext it runs in (data order, checkpoint policy,
                 stop request), frozen models, optimizer step, checkpoints, model loading
    stages/      one explicit loop per stage: lm (PT and SFT), rm, dpo, ppo, and generation
    evaluation/  judging policies on held-out prompts
    demo/        the made-up atlas world: its data generator and its oracle judge
    config.py    the typed config dataclasses every stage reads
"""

IGNORE_INDEX = -100
"""The label of a token that is not trained on or scored (prompt, padding); the one spelling."""
