"""`loraplex train`: PEFT adapters (LoRA, QLoRA, DoRA, AdaLoRA, IA3, prefix, prompt, P-tuning).

    from loraplex.server.train import TrainConfig, train
    summary = train(TrainConfig(model=..., method="lora", data=..., out=...))

Modules: config (TrainConfig), data (JSON Lines -> labelled batches), methods (method -> peft
config), trainer (the loop and summary), progress (the progress bar), greedy (reference decoding),
cli (the subcommand). torch, transformers and peft are imported inside functions only.
"""

from loraplex.server.train.config import METHODS, TrainConfig
from loraplex.server.train.trainer import TrainSummary, train

__all__ = ["METHODS", "TrainConfig", "TrainSummary", "train"]
