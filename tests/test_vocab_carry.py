"""A changed word list (a new held-out word) keeps every learned token embedding, by token string."""

import torch

from raystack.tinyworld.architecture import new_text_encoder
from raystack.tinyworld.pretrain import carry_text_encoder
from raystack.tinyworld.tokenizer import build_tokenizer


def test_carry_text_encoder_by_token_string(tmp_path):
    torch.manual_seed(0)
    old_tok = build_tokenizer(tmp_path / "old", ["a", "red", "circle", "in", "style", "zigzag"])
    new_tok = build_tokenizer(tmp_path / "new", ["a", "red", "circle", "in", "style", "sunset"])
    old_te, new_te = new_text_encoder(old_tok), new_text_encoder(new_tok)
    fresh = new_te.get_input_embeddings().weight.detach().clone()
    kept = carry_text_encoder(old_te, old_tok.get_vocab(), new_te, new_tok.get_vocab())
    old_v, new_v = old_tok.get_vocab(), new_tok.get_vocab()
    shared = [t for t in new_v if t in old_v]
    assert kept == len(shared) and "red</w>" in shared and "sunset</w>" not in shared
    old_e, new_e = old_te.get_input_embeddings().weight, new_te.get_input_embeddings().weight
    for t in ("red</w>", "circle</w>", "<|endoftext|>"):
        assert torch.equal(new_e[new_v[t]], old_e[old_v[t]])
    assert torch.equal(new_e[new_v["sunset</w>"]], fresh[new_v["sunset</w>"]])  # a new word keeps its init
    for (k, a), b in zip(old_te.state_dict().items(), new_te.state_dict().values()):
        if "token_embedding" not in k:
            assert torch.equal(a, b), k
    # The same sentence in both vocabularies encodes to the same hidden states.
    s = "a red circle in style"
    with torch.no_grad():
        h_old = old_te(old_tok(s, return_tensors="pt").input_ids)[0]
        h_new = new_te(new_tok(s, return_tensors="pt").input_ids)[0]
    assert torch.allclose(h_old, h_new)
