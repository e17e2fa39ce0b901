from raystack.tinyworld.concepts import all_words
from raystack.tinyworld.tokenizer import build_tokenizer, learn_merges


def test_every_world_word_is_one_token(tmp_path):
    tok = build_tokenizer(tmp_path, all_words())
    for w in all_words():
        assert tok.tokenize(w) == [w + "</w>"], w
    ids = tok("a red circle in sunset style").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 8


def test_unknown_words_fall_back_to_bytes(tmp_path):
    tok = build_tokenizer(tmp_path, all_words())
    pieces = tok.tokenize("sks")
    assert "".join(pieces) == "sks</w>" and len(pieces) > 1
    assert tok.unk_token_id not in tok("a photo of sks emblem").input_ids[1:-1]


def test_merges_replay_whole_words():
    words = ["striped", "triangle", "stripe", "tri"]
    merges = learn_merges(words)
    assert len(merges) >= max(len(w) for w in words) - 1
