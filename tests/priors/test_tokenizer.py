"""The small CLIP BPE tokenizers gen3d writes for its embedded priors (`gen3d.priors.tokenizer`)."""

from transformers import CLIPTokenizer

from gen3d.priors.tokenizer import write_clip_tokenizer


def test_every_listed_word_is_one_token_whatever_the_order(tmp_path):
    from gen3d.world.catalog import vocabulary
    from gen3d.world.train_prior import VIEW_WORDS
    from gen3d.world.train_video_prior import MOTION_WORDS

    # "pink" before "spinning" and "to" before "toadstool": merges of earlier words used to split later ones
    words = ["pink", "to", "toaster", *vocabulary(), *MOTION_WORDS, *VIEW_WORDS, "spinning", "toadstool"]
    write_clip_tokenizer(tmp_path, words, max_length=16)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    split = [w for w in dict.fromkeys(x.lower() for x in words) if len(tok.tokenize(w)) != 1]
    assert split == ["3d"]  # CLIP's pre-tokenizer splits digits from letters before BPE
    caption = "a brown toadstool, spinning, front view"
    assert tok.tokenize(caption) == ["a</w>", "brown</w>", "toadstool</w>", ",</w>", "spinning</w>", ",</w>",
                                     "front</w>", "view</w>"]


def test_any_text_tokenizes_to_known_ids(tmp_path):
    write_clip_tokenizer(tmp_path, ["red", "mug"], max_length=16)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = tok("über ☃ a rEd MUG\t!", truncation=True, max_length=16).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id == tok.eos_token_id and tok.eos_token_id not in ids[1:-1]  # no unknowns: every byte is known
    assert tok.tokenize("a red mug") == ["a</w>", "red</w>", "mug</w>"]
