"""Tiny BERT (WordPiece) and RoBERTa (byte-level BPE) models and tokenizers built in code, so the
suite never downloads anything."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the capital of france is paris germany berlin italy rome spain madrid europe asia "
         "country city language french german italian spanish official located in was born "
         "a an and on at by river new york united states kingdom london japan tokyo china "
         "beijing india delhi ##s ##ing ##ed , . ' -").split()

TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. Rome is the capital of "
        "Italy. Madrid is located in Spain. New York is a city in the United States. London is the "
        "capital of the United Kingdom. Tokyo is in Japan. Beijing is the capital of China.")


def make_bert_tokenizer(tmp_path):
    from transformers import BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def make_roberta_tokenizer(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 20, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    vocab_file, merges_file = bpe.save_model(str(tmp_path))
    return RobertaTokenizer(vocab=vocab_file, merges=merges_file)


def make_model(kind, tok, hidden=32, layers=2, heads=2, intermediate=64, seed=0):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=intermediate,
                  max_position_embeddings=160, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(**common)).eval()
    return RobertaForMaskedLM(RobertaConfig(**common, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id)).eval()


@pytest.fixture
def bert_tok(tmp_path):
    return make_bert_tokenizer(tmp_path)


@pytest.fixture
def roberta_tok(tmp_path):
    return make_roberta_tokenizer(tmp_path)


@pytest.fixture(params=["bert", "roberta"])
def tiny_mlm(request, tmp_path):
    """(model, tokenizer) for a tiny random BERT and RoBERTa masked LM (dropout off, eval mode)."""
    tok = make_bert_tokenizer(tmp_path) if request.param == "bert" else make_roberta_tokenizer(tmp_path)
    return make_model(request.param, tok), tok


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny BERT masked-LM directory (save_pretrained), loadable by common.load_mlm."""
    tok = make_bert_tokenizer(tmp_path)
    model = make_model("bert", tok)
    d = os.path.join(tmp_path, "tiny_bert")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def store_from_rows(path, rows):
    """A one-shard data.Store at `path` holding `rows` (pack_docs' lists: input_ids, word_start, ent_start,
    ent_end, ent_id per sequence), written as the prepare step writes a shard."""
    import json
    import numpy as np
    import data
    os.makedirs(path, exist_ok=True)
    data._write_shard(str(path), 0, [data._arrays(rows, np.uint16)])
    json.dump({"format": data.FORMAT, "shards": [{"name": "shard-00000"}], "key": "test"},
              open(os.path.join(path, "store.json"), "w"))
    return data.Store(str(path))


@pytest.fixture
def git_repo(tmp_path):
    """A fresh git repository in tmp_path: .git(*args) -> stdout, .write({path: text}),
    .commit({path: text}, message) -> the new HEAD."""
    def git(*a):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    def write(files):
        for f, text in files.items():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f).write_text(text)

    def commit(files, message="code"):
        write(files)
        git("add", "-A")
        git("commit", "-qm", message)
        return git("rev-parse", "HEAD")
    git("init", "-q")
    return SimpleNamespace(git=git, write=write, commit=commit, path=tmp_path)
