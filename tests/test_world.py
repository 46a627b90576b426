import pytest
import torch

from data.world import WorldConfig, generate_world, object_mask, parse_caption
from evaluation.metrics import alignment, copy_similarity, object_region


def test_world_is_deterministic_and_captions_nearly_unique():
    a, b = generate_world(WorldConfig(num_pairs=300, seed=3)), generate_world(WorldConfig(num_pairs=300, seed=3))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, generate_world(WorldConfig(num_pairs=300, seed=4)).images)
    assert len(set(a.captions)) >= 0.95 * len(a.captions)
    assert all(parse_caption(c) == attrs for c, attrs in zip(a.captions, a.attributes))


def test_alignment_recognizes_training_images_and_rejects_wrong_captions():
    world = generate_world(WorldConfig(num_pairs=100, seed=0))
    images = world.images.float() / 255
    right = torch.stack([alignment(images[i:i + 1], world.captions[i]) for i in range(100)])
    assert right.mean() > 0.95
    wrong = torch.stack([alignment(images[i:i + 1], world.captions[(i + 1) % 100]) for i in range(100)])
    assert wrong.mean() < 0.6


def test_copy_similarity_separates_copies_from_same_caption_other_background():
    world = generate_world(WorldConfig(num_pairs=50, seed=0))
    images = world.images.float() / 255
    # The excluded region is the drawn object, dilated by one: from a caption that states its place,
    # or read from the pixels where the caption says only the shape.
    shape_only = generate_world(WorldConfig(num_pairs=50, seed=0, unstated=("color", "size", "position")))
    for image, a, stated, quiet in zip(images, world.attributes, world.captions, shape_only.captions):
        drawn = object_mask(a["shape"], a["size"], a["position"], 16).float()[None, None]
        drawn = torch.nn.functional.max_pool2d(drawn, 3, 1, 1)[0, 0].bool()
        assert torch.equal(object_region(stated, image), drawn) and torch.equal(object_region(quiet, image), drawn)
    region = object_region(world.captions[0], images[0])
    assert torch.isclose(copy_similarity(images[:1], images[0], region), torch.tensor(1.0), atol=1e-5).all()
    # Same caption, fresh background: the object alone must not look like a copy.
    other_background = generate_world(WorldConfig(num_pairs=50, seed=9)).images.float() / 255
    from data.world import render

    redrawn = render(world.attributes[0], other_background[0])
    assert copy_similarity(redrawn[None], images[0], region).abs() < 0.5


def test_alternative_captions_rephrase_the_same_pair_and_leave_the_world_unchanged():
    from data.dataset import build_data
    from tests.conftest import compose_train

    one, four = (generate_world(WorldConfig(num_pairs=50, num_captions=n)) for n in (1, 4))
    assert one.captions == four.captions and torch.equal(one.images, four.images)
    assert one.alternatives == [[]] * 50
    for main, alternatives in zip(four.captions, four.alternatives):
        assert len(set([main, *alternatives])) == 4
        assert all(sorted(a.split()) == sorted(main.split()) for a in alternatives)  # same words, other order
    with pytest.raises(ValueError, match="data.world.num_captions=7; expected 1 to 6"):
        generate_world(WorldConfig(num_pairs=5, num_captions=7))

    cfg = compose_train(["run_dir=unused", "data.world.num_pairs=50", "data.duplication.num_duplicated=0",
                         "data.world.num_captions=4", "data.captions.multiple=true"])
    data = build_data(cfg.data)
    seen = {data.dataset[(0, (1, d))]["caption"] for d in range(40)}
    assert seen == {four.captions[0], *four.alternatives[0]}  # multiple: each draw one of the pair's captions


def test_unstated_colour_leaves_images_alone_and_alignment_judges_what_captions_state():
    full, quiet = (generate_world(WorldConfig(num_pairs=60, seed=2, num_captions=3, unstated=u))
                   for u in ((), ("color",)))
    assert torch.equal(full.images, quiet.images) and full.attributes == quiet.attributes
    for caption, alternatives, attrs in zip(quiet.captions, quiet.alternatives, quiet.attributes):
        assert attrs["color"] not in caption.split()
        stated = {k: v for k, v in attrs.items() if k != "color"}
        assert parse_caption(caption) == stated and all(parse_caption(a) == stated for a in alternatives)
    images = quiet.images.float() / 255
    right = torch.stack([alignment(images[i:i + 1], quiet.captions[i]) for i in range(60)])
    wrong = torch.stack([alignment(images[i:i + 1], quiet.captions[(i + 1) % 60]) for i in range(60)])
    assert right.mean() > 0.95 and wrong.mean() < 0.6
    # The copy metric's region: the same with or without the colour in the caption.
    assert torch.equal(object_region(quiet.captions[0], images[0]), object_region(full.captions[0], images[0]))


def test_impossible_unstated_attributes_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"data.world.unstated has \['colour'\]; expected attributes among"):
        generate_world(WorldConfig(num_pairs=5, unstated=("colour",)))
    with pytest.raises(ValueError, match="has a second size"):
        parse_caption("a big small circle item1")
