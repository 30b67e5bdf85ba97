"""Export / import between fot (Flax) and Hugging Face LLaMA / LongLLaMA (PyTorch) checkpoints.

* ``fot.convert.to_hf.export(params, cfg, out_dir, max_position_embeddings=...)``: safetensors +
  config.json (CLI: ``python -m fot.convert.to_hf``);
* ``fot.convert.from_hf.load_hf(dir) -> (ModelConfig, params)``: the inverse;
* ``fot.convert.mapping``: the param-name table and hooks;
* ``fot.convert.hf_remote``: the FoT transformers remote code written beside the weights
  (``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``: fot's windowed memory
  inference in PyTorch); ``fot.convert.tokenizer``: the run's tokenizer for ``AutoTokenizer``;
* ``fot.convert.torch_longllama.TorchLongLlama``: minimal PyTorch LongLLaMA inference (windows +
  memory layers) on top of transformers' ``LlamaForCausalLM`` weights, for parity checks.

Submodules are not imported here (so ``python -m fot.convert.to_hf`` runs cleanly and nothing needs
torch unless ``torch_longllama`` is imported).
"""
