"""A tiny dense Llama that both tinyllama-ref and transformers (model AND tokenizer) load offline.

transformers' LlamaForCausalLM.save_pretrained writes the weights (hf_models.py); make/tokenizer_files.py
trains a SentencePiece tokenizer next to them. AutoTokenizer reads that tokenizer.model as a LlamaTokenizer,
so lm-evaluation-harness's own `hf` backend can run the very same checkpoint as our backend.
"""

from hf_models import make_hf_llama

VOCAB = 1000


def make_eval_checkpoint(out_dir, max_pos=512, seed=0):
    from tinyllama_ref.make.tokenizer_files import write_tokenizer_files
    make_hf_llama(out_dir, vocab=VOCAB, layers=2, hidden=64, max_pos=max_pos, seed=seed)
    write_tokenizer_files(out_dir, VOCAB, seed=3)
    return out_dir
