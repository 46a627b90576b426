import torch

from data.world import WorldConfig, generate_world, parse_caption
from evaluation.metrics import alignment, caption_region, copy_similarity


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
    region = caption_region(world.captions[0], 16)
    assert torch.isclose(copy_similarity(images[:1], images[0], region), torch.tensor(1.0), atol=1e-5).all()
    # Same caption, fresh background: the object alone must not look like a copy.
    other_background = generate_world(WorldConfig(num_pairs=50, seed=9)).images.float() / 255
    from data.world import render

    redrawn = render(world.attributes[0], other_background[0])
    assert copy_similarity(redrawn[None], images[0], region).abs() < 0.5
