"""A character-level tokenizer built in code, for the embedded tiny model.

Nothing is downloaded: the vocabulary is the four special tokens followed by the printable ASCII
characters (plus tab and newline), one token per character. It is a real `tokenizers` model wrapped
in a transformers fast tokenizer, so `save_pretrained` / `AutoTokenizer.from_pretrained` work like
for any Hub checkpoint and the probes can treat the tiny model like a real one.

    >>> tok = build_char_tokenizer()
    >>> ids = tok("23*47=").input_ids          # <bos> is prepended, like Llama/Qwen-base tokenizers
    >>> tok.convert_ids_to_tokens(ids)
    ['<bos>', '2', '3', '*', '4', '7', '=']
    >>> tok.decode(tok("a  b\\n", add_special_tokens=False).input_ids)
    'a  b\\n'
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Printable ASCII without the vertical tab / form feed / carriage return that `string.printable`
# carries: they only make round-trips platform dependent. Order fixes the ids, so never reorder;
# append new characters at the end.
CHARACTERS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\x0b\x0c\r")


def char_vocab() -> dict[str, int]:
    """Token → id map: specials first (pad 0, bos 1, eos 2, unk 3), then one id per character.

    >>> v = char_vocab()
    >>> v["<pad>"], v["<eos>"], v["0"]
    (0, 2, 4)
    """
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {t: i for i, t in enumerate(tokens)}


def build_char_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Build the character-level fast tokenizer used by the tiny default model.

    Args:
        add_bos: prepend `<bos>` when encoding with `add_special_tokens=True` (the default). The
            tiny model is trained with it; turn off only for experiments.

    Returns:
        A `PreTrainedTokenizerFast` whose `save_pretrained` output reloads with `AutoTokenizer`.
        `padding_side` is "left", as generation with a batch of prompts needs.

    >>> tok = build_char_tokenizer()
    >>> len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    (101, 0, 1, 2)
    """
    vocab = char_vocab()
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every single character is its own pre-token ("[\s\S]" also matches newlines), so spaces are
    # tokens too and nothing is lost. The special tokens are matched before pre-tokenisation.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates without the spaces the default decoder would insert between tokens.
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        # The cleanup pass would eat spaces before punctuation ("a ." → "a."): not a round trip.
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return tok
