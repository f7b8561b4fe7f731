"""A byte-level tokenizer whose token id equals the byte value, loadable by `AutoTokenizer` offline."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

# Specials sit after the 256 byte ids so that `id == byte` holds for every byte and the
# trainer can feed raw `bytes` straight into the model without calling the tokenizer.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)
BYTE_VOCAB_SIZE = 256 + len(SPECIALS)


def _byte_to_char() -> dict[int, str]:
    """The printable stand-in ByteLevel uses for each byte (GPT-2's table, rebuilt here)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer: no merges, so every byte is one token with id == byte value."""
    vocab = {char: byte for byte, char in _byte_to_char().items()}
    for offset, special in enumerate(SPECIALS):
        vocab[special] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: split nothing, only map bytes to their stand-in characters.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_byte_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`."""
    build_byte_tokenizer().save_pretrained(str(out_dir))


assert len(ByteLevel.alphabet()) == 256  # the table above must cover the same 256 stand-ins
