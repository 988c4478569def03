"""The one member-name rule (``pretrain.member_names``): how a tar entry splits into key and member,
what ``data_tools build`` writes a field as, and how a modality finds its member: exact, then named
after the modality, then a dotted entry's one suffix match. The builder and the default decoders
agree: a default build of each field type is read by that type's default decoder."""
from __future__ import annotations

import pytest

from pretrain.member_names import FieldValue, MemberRule, WantedMembers, member_names, split_name

TEXT = ("txt", "json")  # the text decoder's default members


def test_a_tar_entry_splits_at_the_first_dot_of_its_file_name():
    assert split_name("000123.jpg") == ("000123", "jpg")
    assert split_name("s0001.depth.npy") == ("s0001", "depth.npy")
    assert split_name("a/b/000123.jpg") == ("a/b/000123", "jpg")  # webdataset: folders belong to the key
    assert split_name("a.b/k.meta.json") == ("a.b/k", "meta.json")  # a dot in a folder is not the split
    assert split_name("k.TXT") == ("k", "TXT")  # as written; the reader lowercases
    for bad in ("README", ".hidden", "dir/.hidden", "k.", "dir/"):
        assert split_name(bad) is None, bad


def test_what_a_default_build_writes_each_field_as():
    values = [FieldValue("image", "png", from_file=True), FieldValue("thumb", "png", from_file=True),
              FieldValue("url", "txt"), FieldValue("caption", "txt"), FieldValue("label", "json", integer=True),
              FieldValue("meta", "json"), FieldValue("depth", "npy", from_file=True),
              FieldValue("clip", "wav", from_file=True), FieldValue("year", "json", integer=True)]
    assert member_names(values) == {
        "image": "png", "thumb": "thumb.png",  # the first image claims the bare name
        "url": "url.txt", "caption": "txt",  # a caption-like field before other text, whatever the order
        "label": "cls", "year": "year.json",  # an integer is a label only in a label-like field
        "meta": "meta.json", "depth": "depth.npy", "clip": "wav"}
    # a sample's only text field is the txt, whatever its name; --map names come first
    assert member_names([FieldValue("sentence", "txt"), FieldValue("url", "json")]) == \
        {"sentence": "txt", "url": "url.json"}
    assert member_names([FieldValue("image", "jpg", True), FieldValue("alt", "jpg", True)], {"alt": "jpg"}) == \
        {"image": "image.jpg", "alt": "jpg"}


@pytest.mark.parametrize("have, found", [
    ({"txt", "url.txt", "meta.json"}, "txt"),  # exact before anything else
    ({"json", "url.txt"}, "json"),  # img2dataset's metadata JSON is read for its caption field
    ({"png", "url.txt", "meta.json"}, None),  # url.txt and meta.json never become the caption
    ({"png", "title.txt"}, None),
    ({"text.txt", "url.txt"}, "text.txt"),  # named after the modality (text)
])
def test_the_caption_is_never_a_member_of_another_field(have, found):
    assert MemberRule("text", TEXT).find(have) == (found, ())


def test_a_suffix_entry_finds_a_default_build_npy_after_exact_and_named_matches():
    rule = MemberRule("depth", (".npy",))
    assert rule.find({"depth.npy", "png", "txt"}) == ("depth.npy", ())
    assert rule.find({"npy", "depth.npy"}) == ("npy", ())  # exact before named
    assert rule.find({"normals.npy", "depth.npy"}) == ("depth.npy", ())  # named before suffix
    assert rule.find({"emb.npy", "txt"}) == ("emb.npy", ())  # the one suffix match
    assert rule.find({"a.npy", "b.npy"}) == (None, ("a.npy", "b.npy"))  # several: none taken, both named
    assert rule.find({"npyz", "xnpy", "npy.txt"}) == (None, ())
    # a plain entry never matches by suffix; a listed name is exact before the modality's own
    assert MemberRule("vec", ("npy",)).find({"emb.npy"}) == (None, ())
    assert MemberRule("vec", ("emb.npy", ".npy")).find({"vec.npy", "emb.npy"}) == ("emb.npy", ())
    assert MemberRule("Depth", (".NPY",)).find({"depth.npy"}) == ("depth.npy", ())  # without case


def test_webdataset_and_openclip_names_are_read_by_preference():
    from pretrain.data import AudioDecoder, ClassLabelDecoder, ImageDecoder

    image = MemberRule("image", ImageDecoder.members)
    for ext in ("jpg", "png", "jpeg", "webp"):
        assert image.find({ext, "txt", "cls"}) == (ext, ())
    assert image.find({"jpg", "png"}) == ("png", ())  # the list's order decides
    assert image.find({"jpg", "thumb.png"}) == ("jpg", ())
    assert MemberRule("image", ("jpg", "png", "webp")).find({"webp", "txt"}) == ("webp", ())  # OpenCLIP's jpg;png;webp
    assert MemberRule("audio", AudioDecoder.members).find({"flac", "txt"}) == ("flac", ())
    assert MemberRule("audio", AudioDecoder.members).find({"wav", "json"}) == ("wav", ())
    assert MemberRule("labels", ClassLabelDecoder.members).find({"cls", "txt"}) == ("cls", ())
    # the reader keeps exactly the members some modality could read
    wanted = WantedMembers([image, MemberRule("text", TEXT), MemberRule("depth", (".npy",))])
    assert {m for m in ("jpg", "txt", "json", "depth.npy", "x.npy", "url.txt", "meta.json", "cls") if m in wanted} == \
        {"jpg", "txt", "json", "depth.npy", "x.npy"}


@pytest.mark.parametrize("field, value, decoder", [
    ("photo", FieldValue("photo", "png", True), "image"), ("scan", FieldValue("scan", "tif", True), "image"),
    ("caption", FieldValue("caption", "txt"), "text"), ("speech", FieldValue("speech", "flac", True), "audio"),
    ("label", FieldValue("label", "json", integer=True), "class_label"),
    ("depth", FieldValue("depth", "npy", True), "npy"), ("meta", FieldValue("meta", "json"), "json"),
])
def test_a_default_build_of_each_field_type_is_read_by_that_types_default_decoder(field, value, decoder):
    """Beside an image and a caption (of the other types), a modality named after the field, with
    the decoder's default members, finds the field's member."""
    from pretrain.data import DECODERS

    others = [v for v, kind in ((FieldValue("image", "jpg", True), "image"), (FieldValue("caption", "txt"), "text"))
              if kind != decoder]
    names = member_names([value, *others])
    found, _ = MemberRule(field, DECODERS.get(decoder, "decoder").members).find(set(names.values()))
    assert found == names[field], (names, decoder)


def test_member_entries_and_mapped_names_are_checked_naming_the_key(tmp_path):
    from data_tools.build import BuildError, build_shards
    from pretrain.options import ConfigError
    from tests.helpers import caption_rows, data_config, write_jsonl

    for entry, why in (("a b", "spaces"), ("x/y", "'/'"), ("..", "dot"), ("npy.", "dot"), (".pt", "always refused")):
        with pytest.raises(ConfigError, match=rf"data\.modalities\.text\.members\[1\]: .*{why}"):
            data_config(modalities={"text": {"decoder": "text", "members": ["txt", entry]}})
    data_config(modalities={"text": {"decoder": "text", "members": ["txt", ".txt", "caption.txt"]}})
    manifest = write_jsonl(tmp_path / "m.jsonl", caption_rows(tmp_path, 2))
    with pytest.raises(BuildError, match=r"--map caption=a/b: a member name cannot contain '/'"):
        build_shards(manifest, tmp_path / "out", mapping={"caption": "a/b"})
