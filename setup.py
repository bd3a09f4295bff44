"""zephyr_jax: Zephyr-7B alignment (dSFT, AI feedback, dDPO) on Mistral-7B in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="zephyr_jax",
    version="0.1.0",
    description="Zephyr-7B (distilled SFT + distilled DPO on Mistral-7B-v0.1) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # as jax 0.10 (jax 0.11 needs Python 3.12)
    packages=find_packages(include=["zephyr_jax", "zephyr_jax.*"]),
    install_requires=[
        # Lower bounds found by running the tests at older releases (2026-12-02): CI runs jax 0.10.2 / flax 0.12.8;
        # the suite also passes at the GPU machine's jax 0.11.2 / flax 0.12.10 (Python 3.12; bench/RESULTS.md).
        "jax>=0.10.1",  # AbstractDevice.platform (attention picks its kernel by the mesh's platform)
        "flax>=0.12.2",  # Variable.get_value/set_value (0.12.1); nnx.jit that jax 0.10 accepts (0.12.2)
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.17",  # earlier 0.11 releases do not import with a newer jax
        "transformers>=4.48",  # 4.46-4.47 save a tokenizer they cannot load back; 4.x and 5.x configs both read
        "huggingface_hub>=0.26",
        "datasets>=3.0",
        "ml_collections>=1.0",
        "safetensors>=0.4.5",
        "sentencepiece>=0.2",
        "mistral-common>=1.5",  # ships the Mistral-7B-v0.1 tokenizer.model offline
        "jinja2>=3.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "fastapi>=0.110",  # python -m zephyr_jax.serve (OpenAI-compatible HTTP server)
        "uvicorn>=0.29",
        "openai>=1.30",  # data.dialogues / data.feedback: the one HTTP client for teachers, generators and judges
    ],
    extras_require={
        # torch (the parity tests' reference: transformers' PyTorch Mistral on the CPU) is pinned to the release
        # whose CPU wheel CI installs; PyPI's Linux torch pulls several GB of CUDA wheels (README: the CPU index).
        "test": ["pytest>=8", "pytest-xdist>=3.0",  # CI runs the suite on 2 workers (--dist loadgroup)
                 "hypothesis>=6.100", "torch==2.13.0", "psutil>=5.9",
                 # CI executes the notebooks in a Jupyter kernel
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8",
                 # the server's tests drive it with real clients: raw HTTP and lm-eval's local-completions
                 "httpx>=0.27", "aiohttp>=3.9", "tenacity>=8.2",
                 "accelerate>=1.1",  # transformers' TrainingArguments (the schedule test's reference) needs it
                 "trl==1.16.0"],  # the reference trainers (tests/test_trl_reference.py reaches into DPOTrainer)
        "notebooks": ["matplotlib>=3.8"],
        "tfds": ["tensorflow-datasets>=4.9.7", "array_record>=0.5", "importlib_resources"],  # no TensorFlow needed
        "eval": ["lm_eval>=0.4.13"],  # python -m zephyr_jax.lm_eval_adapter
        "gpu": ["jax[cuda12]>=0.10.1"],
        "tpu": ["jax[tpu]>=0.10.1"],
    },
)
