"""The tiny model's tokenizer: byte-level BPE trained on the pipeline's own corpus, plus a chat
template, so the default run needs nothing from a hub."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rlhf_core.errors import ModelLoadError

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# Role markers are special tokens, so every turn boundary is a token boundary and the token ids of
# a rendered prefix are a prefix of the ids of the whole chat (the SFT masking relies on it).
# Every assistant turn ends with the tokenizer's own EOS (not a hard-coded string, so the template
# also fits a base model that has none), which is trained: a model that never sees it never stops.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, PAD, *ROLE_TOKENS.values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS.values()), padding_side="right",
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token and a chat template when it lacks them."""
    from transformers import AutoTokenizer

    path_s = str(path)
    if (path_s.startswith((".", "/")) or Path(path_s).exists()) and not Path(path_s).is_dir():
        raise ModelLoadError(f"{path_s}: tokenizer directory does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path_s, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path_s}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.eos_token is None or tok.eos_token_id is None:
        raise ModelLoadError(f"{path_s}: the tokenizer has no EOS token, so replies cannot be ended, trained to "
                             "stop or padded; set `eos_token` in its tokenizer_config.json [eos]")
    if tok.pad_token is None:  # common for base models; EOS stays trainable in the SFT labels
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
