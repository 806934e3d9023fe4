"""Inventory.replace copies its maps instead of rebuilding them: over random answers
it must hold what an inventory built from scratch over the same images holds."""

from __future__ import annotations

import random

from coordinator.images import ImageKey
from coordinator.model import Inventory, NodeImage

TAGS = [ImageKey(f"reg.io/app:v{i}") for i in range(4)]
DIGESTS = [ImageKey(f"reg.io/app@sha256:{c * 64}") for c in "abcd"]
IDS = [f"sha256:{c * 64}" for c in "0123"]


def random_image(rng: random.Random) -> NodeImage:
    return NodeImage(
        rng.choice(IDS),
        frozenset(rng.sample(TAGS, rng.randint(0, 2))),
        frozenset(rng.sample(DIGESTS, rng.randint(0, 2))),
        pinned=rng.random() < 0.5,
        pin_owned=rng.random() < 0.5,
        size=rng.randint(1, 9),
    )


def test_replace_holds_what_a_fresh_inventory_holds() -> None:
    rng = random.Random(7)
    for _ in range(300):
        inventory = Inventory([], 0.0)
        images: list[NodeImage] = []
        for _ in range(rng.randint(1, 12)):
            image = random_image(rng)
            inventory = inventory.replace(image)
            images = [i for i in images if i.image_id != image.image_id] + [image]
            fresh = Inventory(images, 0.0)
            assert inventory.images == fresh.images
            assert inventory.same_images(fresh)
            for key in (*TAGS, *DIGESTS):
                assert inventory.lookup(key) == fresh.lookup(key), key
            for image_id in IDS:
                assert inventory.by_id(image_id) == fresh.by_id(image_id)


def test_shared_holdings_hold_what_a_fresh_inventory_holds() -> None:
    """The same as above over a few image objects reused by many inventories, as a
    fleet's are: most replaces then find holdings another inventory made."""
    rng = random.Random(11)
    pool = [random_image(rng) for _ in range(8)]
    for _ in range(300):
        inventory = Inventory([], 0.0)
        images: list[NodeImage] = []
        for _ in range(rng.randint(1, 10)):
            image = rng.choice(pool)
            inventory = inventory.replace(image)
            images = [i for i in images if i.image_id != image.image_id] + [image]
            fresh = Inventory(images, 0.0)
            assert inventory.same_images(fresh)
            for key in (*TAGS, *DIGESTS):
                assert inventory.lookup(key) is fresh.lookup(key), key
            for image_id in IDS:
                assert inventory.by_id(image_id) is fresh.by_id(image_id)
