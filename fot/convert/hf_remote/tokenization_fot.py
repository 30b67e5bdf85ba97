"""Tokenizer of a FoT model exported by fot (``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``).

Two vocabularies, whichever file the export wrote:

* ``tokenizer.model``: the run's SentencePiece model, applied exactly as in training (fot's seqio
  vocabulary = ``SentencePieceProcessor.encode``; needs the ``sentencepiece`` package);
* ``id_table.json``: ``{"tokens": [...]}`` — the id table of a synthetic task (e.g. the dictionary
  lookup's ``<pad> <k> <v> <q> s4 s5 ...``); text is whitespace-separated token names.

``add_bos`` (tokenizer_config.json; fot's data option of that name — not ``add_bos_token``, which
transformers 5 drops when saving) prepends the BOS id to every encoded text, as the run's training
data did; ``add_eos`` appends EOS.
"""
import json
import os

from transformers import PreTrainedTokenizer

try:
    import sentencepiece
except ImportError:  # only the SentencePiece vocabulary needs it
    sentencepiece = None

VOCAB_FILES = {"vocab_file": "tokenizer.model", "id_table_file": "id_table.json"}


class FotTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, id_table_file=None, add_bos=False, add_eos=False, **kwargs):
        self.sp = self.pieces = None
        if vocab_file and os.path.isfile(vocab_file):
            if sentencepiece is None:
                raise ImportError("this tokenizer (tokenizer.model) needs the sentencepiece package: "
                                  "pip install sentencepiece")
            self.sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
            self.pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        elif id_table_file and os.path.isfile(id_table_file):
            with open(id_table_file, encoding="utf-8") as f:
                self.pieces = list(json.load(f)["tokens"])
        else:
            raise ValueError("FotTokenizer needs tokenizer.model (SentencePiece) or id_table.json")
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.vocab_file, self.id_table_file = vocab_file, id_table_file
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.total_vocab_size = len(self.pieces)
        super().__init__(add_bos=self.add_bos, add_eos=self.add_eos, **kwargs)

    @property
    def vocab_size(self):
        return len(self.pieces)

    def get_vocab(self):
        vocab = dict(self.ids)
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        if self.sp is not None:
            return self.sp.encode(text, out_type=str)
        return text.split()

    def _convert_token_to_id(self, token):
        if token not in self.ids:
            if self.sp is not None:
                return self.sp.piece_to_id(token)
            raise ValueError(f"token {token!r} is not in the id table (id_table.json)")
        return self.ids[token]

    def _convert_id_to_token(self, index):
        return self.pieces[int(index)]

    def convert_tokens_to_string(self, tokens):
        if self.sp is not None:
            return self.sp.decode_pieces(list(tokens))
        return " ".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos and self.eos_token_id is not None else []
        out = bos + list(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + list(token_ids_1) + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] * (self.add_bos and self.bos_token_id is not None), [1] * (
            self.add_eos and self.eos_token_id is not None)
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def save_vocabulary(self, save_directory, filename_prefix=None):
        prefix = (filename_prefix + "-") if filename_prefix else ""
        if self.sp is not None:
            out = os.path.join(save_directory, prefix + VOCAB_FILES["vocab_file"])
            with open(out, "wb") as f:
                f.write(self.sp.serialized_model_proto())
        else:
            out = os.path.join(save_directory, prefix + VOCAB_FILES["id_table_file"])
            with open(out, "w", encoding="utf-8") as f:
                json.dump({"tokens": self.pieces}, f)
        return (out,)
