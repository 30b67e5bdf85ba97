"""Transformers remote code for FoT models: ``fot.convert.to_hf`` copies ``configuration_fot.py``,
``modeling_fot.py`` and ``attention_fot.py`` (``FILES``) beside the exported weights, where
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them, and
``tokenization_fot.py`` with an exported tokenizer (``fot.convert.tokenizer``). They import only torch,
transformers (and sentencepiece for a SentencePiece tokenizer), never fot or JAX; this package is
their home in the source tree.
"""
import os

FILES = ("configuration_fot.py", "modeling_fot.py", "attention_fot.py")
DIR = os.path.dirname(os.path.abspath(__file__))
AUTO_MAP = {"AutoConfig": "configuration_fot.FotConfig",
            "AutoModelForCausalLM": "modeling_fot.FotForCausalLM"}
