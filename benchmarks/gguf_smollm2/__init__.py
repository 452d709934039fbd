"""SmolLM2-135M-Instruct (Q4_1 GGUF) in MoLink: chat over 3 stages, agreement with
`transformers`, 4-bit vs bf16 speed and memory. Run: ``python -m benchmarks.gguf_smollm2``."""
