"""condfx.eval: perplexity, generation and synthetic recall tasks."""

from condfx.eval.generate import generate_text, greedy
from condfx.eval.perplexity import (
    PerplexityResult,
    documents_to_ids,
    model_logits,
    perplexity,
    perplexity_of_text,
    split_stories,
)
from condfx.eval.tasks import (
    MQARConfig,
    make_mqar_batch,
    make_passkey_prompt,
    mqar_accuracy,
    passkey_accuracy,
    train_mqar_model,
)

__all__ = [
    "MQARConfig",
    "PerplexityResult",
    "documents_to_ids",
    "generate_text",
    "greedy",
    "make_mqar_batch",
    "make_passkey_prompt",
    "model_logits",
    "mqar_accuracy",
    "passkey_accuracy",
    "perplexity",
    "perplexity_of_text",
    "split_stories",
    "train_mqar_model",
]
