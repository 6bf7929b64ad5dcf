"""Class hierarchies (hand-worked, the real CIFAR-100 and ImageNet files, real WordNet) and caption similarity."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import shared

from rayhash.semantics import (ClassHierarchy, ensure_wordnet, install_wordnet, sentence_embeddings,
                               sentence_similarity)

#   root ─┬─ animal ─┬─ dog
#         │          └─ bird ─┬─ eagle
#         │                   └─ owl
#         └─ car
SMALL = [("root", "animal"), ("root", "car"), ("animal", "dog"), ("animal", "bird"), ("bird", "eagle"),
         ("bird", "owl")]


def test_small_tree_hand_worked():
    h = ClassHierarchy(SMALL)
    assert h.leaves == ["car", "dog", "eagle", "owl"] and h.roots == ["root"]
    assert {n: h.height(n) for n in h.nodes} == {"root": 3, "animal": 2, "bird": 1, "car": 0, "dog": 0,
                                                 "eagle": 0, "owl": 0}
    assert {n: h.depth(n) for n in h.nodes} == {"root": 0, "animal": 1, "car": 1, "dog": 2, "bird": 2,
                                                "eagle": 3, "owl": 3}
    assert h.lcs("eagle", "owl") == "bird" and h.lcs("eagle", "dog") == "animal" and h.lcs("dog", "car") == "root"
    # s = 1 - height(lcs)/3: eagle-owl 1 - 1/3, eagle-dog 1 - 2/3, dog-car 0, self 1
    S = h.similarity_matrix(["eagle", "owl", "dog", "car"])
    np.testing.assert_allclose(S, [[1, 2 / 3, 1 / 3, 0], [2 / 3, 1, 1 / 3, 0], [1 / 3, 1 / 3, 1, 0],
                                   [0, 0, 0, 1]], atol=1e-7)
    # Wu-Palmer with node-counting depth D = depth + 1: eagle-owl 2*3/(4+4), eagle-dog 2*2/(4+3), dog-car 2/(3+2)
    W = h.similarity_matrix(["eagle", "owl", "dog", "car"], metric="wu_palmer")
    assert W[0, 1] == pytest.approx(0.75) and W[0, 2] == pytest.approx(4 / 7) and W[2, 3] == pytest.approx(0.4)


def test_dag_lcs_is_deepest_common_ancestor():
    # dog and cat are both mammals and pets; mammal (depth 2) beats pet (depth 1) and animal (depth 1)
    h = ClassHierarchy([("root", "animal"), ("animal", "mammal"), ("mammal", "dog"), ("mammal", "cat"),
                        ("root", "pet"), ("pet", "dog"), ("pet", "cat"), ("root", "rock")])
    assert h.depth("dog") == 3 and h.height("root") == 3 and h.height("pet") == 1
    assert h.lcs("dog", "cat") == "mammal"
    assert h.similarity("dog", "cat") == pytest.approx(1 - 1 / 3)


def test_parent_child_file_parsing_and_errors(tmp_path):
    f = tmp_path / "h.txt"
    f.write_text("# comment\n10 1\n10 2\n\n11 10\n11 3\n")
    h = ClassHierarchy.from_parent_child_file(f)
    assert h.leaves == [1, 2, 3] and h.max_height == 2 and h.similarity(1, 2) == pytest.approx(0.5)
    f.write_text("a b\nb c d\n")
    with pytest.raises(ValueError, match=r"h\.txt:2: expected 'parent child'"):
        ClassHierarchy.from_parent_child_file(f)
    f.write_text("a b\nb c\nc a\n")
    with pytest.raises(ValueError, match="cycle"):
        ClassHierarchy.from_parent_child_file(f)
    with pytest.raises(KeyError, match="zebra"):
        ClassHierarchy(SMALL).similarity_matrix(["dog", "zebra"])


def tree_similarity_bruteforce(path, leaves):
    """Independent computation for a *tree*: walk parent pointers; height by recursion over children."""
    parent, children = {}, {}
    for line in open(path):
        p, c = line.split()
        parent[c] = p
        children.setdefault(p, []).append(c)

    def height(n):
        return 1 + max(height(c) for c in children[n]) if n in children else 0

    def up(n):
        out = [n]
        while out[-1] in parent:
            out.append(parent[out[-1]])
        return out

    root = up(leaves[0])[-1]
    H = height(root)
    paths = [up(x) for x in leaves]
    S = np.array([[1 - height(next(n for n in a if n in set(b))) / H for b in paths] for a in paths])
    return S, H


def test_real_cifar100_hierarchy():
    path = shared("hierarchies/Cifar-Hierarchy/cifar.parent-child.txt")
    h = ClassHierarchy.from_parent_child_file(path)
    assert h.max_height == 8 and h.roots == [108] and h.leaves == list(range(100))
    S = h.similarity_matrix(list(range(100)))
    want, H = tree_similarity_bruteforce(path, [str(i) for i in range(100)])
    assert H == 8
    np.testing.assert_allclose(S, want, atol=1e-6)
    # by hand from the file: apple(0) & pear(57) meet at pome (height 1), apple & orange(53) at fruit (height 2),
    # apple & bus(13) only at the root entity (height 8)
    assert h.lcs(0, 57) == 103 and S[0, 57] == pytest.approx(1 - 1 / 8)
    assert h.lcs(0, 53) == 102 and S[0, 53] == pytest.approx(1 - 2 / 8)
    assert h.lcs(0, 13) == 108 and S[0, 13] == 0


def test_real_imagenet_mintree_1000_leaves():
    path = shared("hierarchies/ILSVRC/wordnet.parent-child.mintree.txt")
    import json

    wnids = [v[0] for _, v in sorted(json.load(open(shared("hierarchies/ILSVRC/imagenet_class_index.json"))).items(),
                                       key=lambda kv: int(kv[0]))]
    h = ClassHierarchy.from_parent_child_file(path)
    assert sorted(h.leaves) == sorted(wnids)
    S = h.similarity_matrix(wnids)  # string ids; 1000 x 1000
    sample = wnids[::37]
    want, _ = tree_similarity_bruteforce(path, sample)
    np.testing.assert_allclose(S[::37, ::37], want, atol=1e-6)


def test_wordnet_tench_shark_vehicle():
    shared("nltk_data/corpora/wordnet")
    tench, shark, ambulance, sports_car = "n01440764", "n01491361", "n02701002", "n04285008"
    h = ClassHierarchy.from_wordnet([tench, shark, ambulance, sports_car])
    assert h.roots == ["n00001740"]  # entity.n.01
    assert h.lcs(tench, shark) == "n02512053"  # fish.n.01
    S = h.similarity_matrix([tench, shark, ambulance, sports_car])
    assert S[0, 1] > S[0, 2] and S[0, 1] > S[0, 3]
    assert S[2, 3] > S[0, 2]  # two motor vehicles are closer than fish and vehicle
    assert np.allclose(np.diag(S), 1) and np.allclose(S, S.T)
    # independent check of the LCS against nltk's own lowest common hypernym (max depth)
    wn = ensure_wordnet()
    a, b = wn.synset_from_pos_and_offset("n", 1440764), wn.synset_from_pos_and_offset("n", 1491361)
    assert a.lowest_common_hypernyms(b)[0].name() == "fish.n.01"


def test_wordnet_by_synset_names():
    shared("nltk_data/corpora/wordnet")
    h = ClassHierarchy.from_wordnet(["apple.n.01", "orange.n.01", "car.n.01", "n01440764"])
    assert "entity.n.01" in h.roots and "tench.n.01" in h.leaves
    S = h.similarity_matrix(["apple.n.01", "orange.n.01", "car.n.01", "n01440764"])  # wnid via alias
    assert S[0, 1] > S[0, 2] and S[0, 1] > S[0, 3]
    with pytest.raises(ValueError, match="unknown WordNet synset"):
        ClassHierarchy.from_wordnet(["n99999999"])


def test_missing_wordnet_error_names_the_command(tmp_path):
    code = textwrap.dedent("""
        import nltk
        nltk.data.path[:] = []
        from rayhash.semantics import ensure_wordnet
        try:
            ensure_wordnet()
        except LookupError as e:
            print("ERR", e)
    """)
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "ERR" in out and "rayhash data wordnet" in out and "corpora" in out


def test_install_wordnet_reuses_present_data():
    """Offline route: a folder that already holds corpora/wordnet is used as is (no download)."""
    folder = shared("nltk_data")
    assert install_wordnet(folder) == str(folder)


def _flickr_captions(n_images):
    groups = {}
    with open(shared("flickr8k-1k/captions.txt"), encoding="utf-8") as f:
        assert f.readline().strip() == "image,caption"
        for line in f:
            image, caption = line.rstrip("\n").split(",", 1)  # split on the FIRST comma only
            groups.setdefault(image, []).append(caption)
            if len(groups) > n_images:
                del groups[image]
                break
    return groups


def test_sentence_similarity_real_flickr_captions():
    groups = _flickr_captions(30)
    texts = [c for caps in groups.values() for c in caps]
    owner = np.repeat(np.arange(len(groups)), [len(c) for c in groups.values()])
    S = sentence_similarity(texts)
    same = owner[:, None] == owner[None, :]
    off = ~np.eye(len(texts), dtype=bool)
    mean_same, mean_diff = S[same & off].mean(), S[~same].mean()
    assert mean_same > mean_diff + 0.2, (mean_same, mean_diff)
    # embeddings are unit vectors and the similarity is their clipped cosine
    E = sentence_embeddings(texts)
    assert E.dtype == np.float32 and np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(S, np.clip(E @ E.T, 0, 1), atol=1e-5)
    np.testing.assert_allclose(sentence_similarity(E), S, atol=1e-5)
