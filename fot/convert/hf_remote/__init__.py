"""Transformers remote code for FoT models (``configuration_fot.py``, ``modeling_fot.py``,
``attention_fot.py``): ``fot.convert.to_hf`` copies these files beside the exported weights, where
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them. They import only
torch and transformers (never fot or JAX); this package is their home in the source tree.
"""
import os

FILES = ("configuration_fot.py", "modeling_fot.py", "attention_fot.py")
DIR = os.path.dirname(os.path.abspath(__file__))
AUTO_MAP = {"AutoConfig": "configuration_fot.FotConfig",
            "AutoModelForCausalLM": "modeling_fot.FotForCausalLM"}
