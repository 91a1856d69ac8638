"""toolr1_jax: Tool-R1 style agentic RL (code agent + GRPO + dynamic sample queue) in JAX."""

import setuptools

# Pinned to the versions the test suite runs against; JAX, Flax and Orbax move fast.
JAX_VERSION = "0.10.2"

setuptools.setup(
    name="toolr1_jax",
    version="0.1.0",
    description="Sample-efficient RL for agentic tool use (Tool-R1) in JAX/Flax NNX.",
    packages=setuptools.find_packages(include=["toolr1_jax", "toolr1_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "transformers==5.23.0",
        "tokenizers>=0.22",
        "ml_collections>=1.1.0",
        "tensorflow-datasets==4.9.10",
        "array-record>=0.8.1",
        "grain>=0.2.12",
        "safetensors>=0.6",
        # GGUF (llama.cpp's format): read and dequantize; the named SmolLM2 model is one.
        "gguf==0.19.0",
        "numpy>=2.0",
        "pandas>=2.2",
        "pyarrow>=18",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "openai>=2.0",
        "starlette>=0.46",
        "uvicorn>=0.34",
        "psutil>=5.9",
        "scipy>=1.13",
        "sympy>=1.13",
        "openpyxl>=3.1",
        "pypdf>=5.0",
        "python-docx>=1.1",
        "python-pptx>=1.0",
        "beautifulsoup4>=4.12",
        "rank-bm25>=0.2.2",
        "httpx>=0.27",
        "matplotlib>=3.9",
        "pyseccomp>=0.1.2",  # seccomp filters for the sandbox, through the system's libseccomp
        "av>=14",  # PyAV (bundles FFmpeg): a video attachment's audio track for transcription
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-asyncio>=0.24",
            "pytest-timeout>=2.3",
            "ruff>=0.8",
            # CPU build, for parity tests against transformers' PyTorch models.
            "torch==2.13.0",
            # transformers' own GGUF loader (the reference in the SmolLM2 parity tests) needs it.
            "accelerate>=1.0",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "gpu": [f"jax[cuda12]=={JAX_VERSION}"],
    },
)
