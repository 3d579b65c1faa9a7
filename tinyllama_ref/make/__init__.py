"""Checkpoints this project writes: random ones of any Llama-2 shape (synth.py, with a SentencePiece tokenizer
trained on generated text: tokenizer_files.py), and GPTQ-quantized ones from a dense checkpoint (gptq.py, the
algorithm; quantize.py, the layer-by-layer driver). One streaming writer (safetensors_writer.py) serves both."""
