"""Exporting models: adapters merged, int8 quantization (bitsandbytes), Hugging Face-loadable output."""
