"""A word-level CLIP-style tokenizer built with `tokenizers`, loadable by `AutoTokenizer` offline."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # longest caption is 10 words; SD pads every prompt to model_max_length


def build_word_tokenizer(texts: list[str], max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Vocabulary = specials + every lower-cased word/punctuation in `texts`, sorted for stable ids."""
    pre = pre_tokenizers.Whitespace()  # splits words and punctuation, like CLIP's regex does
    words = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text.lower())})
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    backend.add_special_tokens([PAD, UNK, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def save_word_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`."""
    tokenizer.save_pretrained(str(out_dir))
