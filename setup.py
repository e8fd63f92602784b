"""Installable package for sfgrpo: SpatialFlow-GRPO in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="sfgrpo",
    version="0.1.0",
    description="SpatialFlow-GRPO: online RL with spatial credit for flow-matching image-editing models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sfgrpo", "sfgrpo.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "jax>=0.10.0,<0.11",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "ml-collections>=1.0.0,<2",
        "einops>=0.8.0,<0.9",
        "transformers>=5.0.0,<6",
        "tensorflow-datasets>=4.9.9,<4.10",
        "array-record>=0.8.0,<0.9",
        "grain>=0.2.12,<0.3",
        "safetensors>=0.5.0,<0.9",
        "pillow>=10.0,<13",
        "tqdm>=4.66,<5",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        # TensorBoard event files and the reward plot without TensorFlow.
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # Accelerator builds of jax for the launch scripts (launch/); the CPU jax above runs everything.
        "tpu": ["jax[tpu]>=0.10.0,<0.11"],
        "cuda": ["jax[cuda12]>=0.10.0,<0.11"],
        "test": [
            "pytest>=8.0,<10",
            # Two test processes: most tests are single-threaded XLA compiles (see pyproject's addopts).
            "pytest-xdist>=3.8,<4",
            "hypothesis>=6.100,<7",
            # Pinned: tests/test_style.py runs its formatter, which a newer release may change.
            "ruff==0.17.6",
            # The PyTorch references for the parity tests. 2.13.0 is the CPU wheel served locally.
            "torch==2.13.0",
            "diffusers>=0.37,<0.43",
            # diffusers loads LoRA adapters through PEFT (tests/test_lora.py loads our export there).
            "peft>=0.17,<0.22",
        ],
    },
)
