"""fot: Focused Transformer (FoT) training and inference in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "gin-config>=0.5.0,<0.6",
    "absl-py>=2.1",
    "clu>=0.0.12",
    "numpy>=1.26",
    "sentencepiece>=0.2.0,<0.3",
    "matplotlib>=3.8",
    # clu's TensorBoard writer needs TensorFlow's summary ops and tensorboard (TF 2.21 no longer
    # brings it). `tensorflow`, not `tensorflow-cpu`: tensorflow-text (seqio) requires it.
    "tensorflow>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
]

EXTRAS = {
    # seqio pipeline (issue: data); tensorflow, not tensorflow-cpu (tensorflow-text needs it).
    "data": [
        "seqio==0.0.20",
        "tensorflow-datasets>=4.9.10,<5",
    ],
    "test": [
        "pytest>=8",
        "chex>=0.1.90",
        "torch==2.13.0",
        "transformers>=4.45",
        "safetensors>=0.4",
        "faiss-cpu>=1.8",
    ],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
}
EXTRAS["test"] = EXTRAS["test"] + EXTRAS["data"]

setup(
    name="fot",
    version="0.1.0",
    description="Focused Transformer (contrastive crossbatch training, external-memory inference) in JAX/Flax",
    packages=find_packages(include=["fot", "fot.*"]),
    package_data={"fot.ops": ["csrc/*.cc"]},  # the CPU top-k kernel's source, compiled on first use
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
