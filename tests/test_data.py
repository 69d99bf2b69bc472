import json

import numpy as np
import pytest
import torch

from mmgpt.data.features import DataFileError, load_features_file
from mmgpt.data.modules import DigitsDataModule, FeaturesDataModule
from mmgpt.data.samples import DeviceBatches, Samples, tokenize_captions
from mmgpt.data.digits import DigitsTask, caption_for, digits_of, patchify, split_images
from mmgpt.tokenizer import ByteTokenizer


def test_caption_is_a_function_of_every_digit():
    assert caption_for([7, 3]) == "seven three sum 10"
    assert caption_for([3, 7]) != caption_for([7, 3])


def test_patchify_round_trip():
    img = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    p = patchify(img, 4)
    assert p.shape == (1, 4, 16)
    assert np.allclose(p[0, 1].reshape(4, 4) * 16, img[0, :4, 4:])  # second patch = top-right block


def test_digits_split_is_by_image():
    train, val = split_images(1797, 0.2, seed=0)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 1797
    dm = DigitsDataModule(train_samples=200, val_samples=50)
    dm.setup()
    assert set(dm.val_pick.ravel()) <= set(dm.val_image_ids)
    assert dm.val_set.context["image"].shape == (50, 8, 16)


def test_digits_as_pixel_tokens_in_either_direction():
    dm = DigitsDataModule(train_samples=20, val_samples=5, image_tokens=True, digits_per_sample=1)
    assert (dm.provides["image"].kind, dm.provides["image"].vocab_size, dm.provides["image"].end_id) == \
        ("discrete", 18, 17) and dm.context_lens == {}
    train, val = dm.build()
    pixels = np.array(val.values["image"][0])
    assert pixels.shape == (64,) and pixels.min() >= 0 and pixels.max() <= 16 and pixels.max() >= 10  # ink
    from sklearn.datasets import load_digits
    digits = load_digits()
    assert pixels.tolist() == digits.images[dm.val_pick[0, 0]].astype(int).ravel().tolist()
    assert digits_of(val.references[0]) == [digits.target[dm.val_pick[0, 0]]]
    from mmgpt.model import GPTConfig, Modality
    draw = GPTConfig(vocab_size=259, modalities=[Modality("text", "discrete"), dm.provides["image"]],
                     context=["text"], decoded="image")
    val.tokenize(ByteTokenizer(), draw)
    ids, lengths = val.context["text"]
    assert ids[0, : lengths[0]].tolist() == list(val.references[0].encode())  # the caption, no BOS / EOS
    assert val.input_ids[0].tolist() == [17, *pixels.tolist(), 17]  # end token frames the drawn image
    assert val.targets[0].tolist() == [*pixels.tolist(), 17, -100]
    assert np.array_equal(dm.task.drawn_images([pixels.tolist(), pixels[:10].tolist()])[:, 0].reshape(2, 64),
                          np.stack([pixels, np.r_[pixels[:10], np.zeros(54)]]))  # a short drawing ends blank


def test_image_codes_are_a_coarser_drawing_the_reader_still_reads():
    task = DigitsTask(image_tokens=True, image_codes=64, digits_per_sample=1, val_samples=200)
    assert (task.provides["image"].vocab_size, task.provides["image"].end_id, task.tokens_per_image) == (65, 64, 16)
    _, val, pick, _ = task.build()
    codes = [list(v) for v in val.values["image"]]
    assert all(len(c) == 16 and 0 <= min(c) and max(c) < 64 for c in codes)
    images = task.drawn_images(codes)  # (n, 1, 8, 8): each 2x2 patch its code's centroid
    from sklearn.datasets import load_digits
    real = load_digits().images[pick[:, 0]]
    assert np.abs(images[:, 0] - real).mean() < 1.0  # close to the real pixels (0..16)
    reader = task.reader()
    assert reader.held_out_accuracy > 0.97
    assert np.mean(reader.recognised(images, val.references)) > 0.95  # what the codes keep, the reader still reads
    shuffled = reader.recognised(images, val.references[1:] + val.references[:1])
    assert np.mean(shuffled) < 0.3  # negative control: the wrong caption is not recognised


def test_captions_pad_to_the_longest_and_targets_ignore_padding():
    tok = ByteTokenizer()
    input_ids, targets = tokenize_captions(tok, ["ab", "abcd"])
    assert input_ids[0].tolist() == [tok.bos_id, 97, 98, tok.eos_id, tok.pad_id, tok.pad_id]
    assert targets[0].tolist() == [97, 98, tok.eos_id, -100, -100, -100]


def caption_config():
    from mmgpt.model import GPTConfig, image_to_text
    return GPTConfig(vocab_size=259, **image_to_text(dim=3))


def test_every_batch_has_the_dataset_shape():
    texts = ["a", "abcdef", "ab", "a", "abc"]
    ds = Samples({"image": np.zeros((5, 2, 3), np.float32), "text": texts}, texts).tokenize(ByteTokenizer(),
                                                                                            caption_config())
    assert ds.decoded_len == 8  # [BOS] abcdef [EOS]
    batch = ds.__getitems__([0, 3])  # two short captions still come padded to the dataset's longest
    assert batch["input_ids"].shape == batch["targets"].shape == (2, 8)
    assert batch["context"]["image"].shape == (2, 2, 3) and batch["references"] == ["a", "a"]


def test_device_batches_are_full_and_reshuffled_each_epoch():
    texts = [str(i) for i in range(10)]
    ds = Samples({"image": np.arange(30, dtype=np.float32).reshape(10, 1, 3), "text": texts}, texts)
    batches = DeviceBatches(ds.tokenize(ByteTokenizer(), caption_config()), batch_size=4, device=torch.device("cpu"),
                            seed=0)
    epochs = [[b["context"]["image"][:, 0, 0].int().tolist() for b in batches] for _ in range(2)]
    for epoch in epochs:
        assert len(epoch) == len(batches) == 2 and all(len(b) == 4 for b in epoch)  # the partial batch is dropped
        assert len(set(sum(epoch, []))) == 8  # no sample twice in an epoch
    assert epochs[0] != epochs[1]


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo 9", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "héllo 9"
    assert ByteTokenizer.from_dict(tok.to_dict()) == tok


def test_features_npz_and_jsonl(tmp_path):
    feats = np.random.rand(10, 3, 4).astype(np.float32)
    texts = [f"t{i}" for i in range(10)]
    np.savez(tmp_path / "d.npz", features=feats, texts=np.array(texts))
    with open(tmp_path / "d.jsonl", "w") as f:
        for x, t in zip(feats, texts):
            f.write(json.dumps({"features": x.tolist(), "text": t}) + "\n")
    for name in ("d.npz", "d.jsonl"):
        x, t = load_features_file(tmp_path / name)
        assert np.allclose(x, feats) and t == texts
    dm = FeaturesDataModule(str(tmp_path / "d.npz"), val_fraction=0.2)
    dm.setup()
    assert dm.context_lens == {"features": 3} and dm.provides["features"].dim == 4
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2


@pytest.mark.parametrize("content,match", [
    ('{"features": [[1, 2]], "text": "a"}\n{"features": [[1, 2, 3]], "text": "b"}\n', r"d\.jsonl:2: features shape"),
    ('{"features": [[1, 2]]}\n', r"d\.jsonl:1: each line needs keys"),
    ("not json\n", r"d\.jsonl:1: not valid JSON"),
    ('{"features": [1, 2], "text": "a"}\n', r"must be P x F"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataFileError, match=match):
        load_features_file(tmp_path / "d.jsonl")


def test_malformed_npz_and_missing_file(tmp_path):
    np.savez(tmp_path / "d.npz", feats=np.zeros((2, 3, 4)))
    with pytest.raises(DataFileError, match=r"d\.npz: missing array\(s\) \['features', 'texts'\]"):
        load_features_file(tmp_path / "d.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match=r"bad\.npz: not a readable \.npz"):
        load_features_file(tmp_path / "bad.npz")
    with pytest.raises(DataFileError, match=r"nope\.npz: no such data file"):
        load_features_file(tmp_path / "nope.npz")
    np.savez(tmp_path / "n.npz", features=np.full((2, 3, 4), np.nan), texts=np.array(["a", "b"]))
    with pytest.raises(DataFileError, match="NaN"):
        load_features_file(tmp_path / "n.npz")
