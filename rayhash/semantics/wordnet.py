"""WordNet through nltk: provisioning (``rayhash data wordnet``) and synset look-up by wnid or name."""
from __future__ import annotations

import os
import warnings

from rayhash import settings

WORDNET_HELP = (
    "WordNet for nltk was not found (searched NLTK_DATA and nltk's default paths). Install it with "
    "`rayhash data wordnet` (downloads with nltk; honours $NLTK_DATA), or offline: copy a `wordnet` folder "
    "(the WordNet 3.0 files: data.noun, index.noun, ...) into $NLTK_DATA/corpora/ and set NLTK_DATA to that "
    "nltk_data folder."
)


def ensure_wordnet():
    """Return nltk's loaded WordNet reader, or raise LookupError telling how to install it.

    Install: ``rayhash data wordnet`` (online; into ``$NLTK_DATA`` or nltk's default folder). Offline: copy a
    ``wordnet`` folder holding the WordNet 3.0 database files into ``$NLTK_DATA/corpora/`` (so that
    ``$NLTK_DATA/corpora/wordnet/data.noun`` exists) and export ``NLTK_DATA``.
    """
    import nltk

    _add_env_paths(nltk)
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
    except LookupError as e:
        raise LookupError(WORDNET_HELP) from e
    return wn


def install_wordnet(target_dir: str | os.PathLike | None = None) -> str:
    """Download WordNet with nltk's downloader into ``target_dir`` (default: first ``$NLTK_DATA`` entry, else
    nltk's default folder) and return that folder. Already-present data is not downloaded again."""
    import nltk

    env = (settings.NLTK_DATA.get() or "").split(os.pathsep)[0]
    target = str(target_dir or env or nltk.downloader.Downloader().default_download_dir())
    os.makedirs(target, exist_ok=True)
    if _has_wordnet(target):
        return _use(nltk, target)
    why = "download failed"
    try:
        ok = nltk.download("wordnet", download_dir=target, quiet=True, raise_on_error=True)
    except Exception as e:  # network errors surface as URLError/ValueError
        ok, why = False, str(e)
    if not ok:
        raise RuntimeError(f"nltk could not download WordNet into {target} ({why}). Offline: copy a `wordnet` "
                           f"folder (data.noun, index.noun, ...) into {os.path.join(target, 'corpora')}/ and set "
                           f"NLTK_DATA={target}")
    return _use(nltk, target)


def _has_wordnet(folder: str) -> bool:
    corpora = os.path.join(folder, "corpora")
    return os.path.isfile(os.path.join(corpora, "wordnet", "data.noun")) or os.path.isfile(
        os.path.join(corpora, "wordnet.zip"))


def _use(nltk, target: str) -> str:
    if target not in nltk.data.path:
        nltk.data.path.insert(0, target)
    ensure_wordnet()
    return target


def wordnet_synset(name: str):
    """A noun synset from a wnid (``"n01440764"``) or a synset name (``"apple.n.01"``)."""
    wn = ensure_wordnet()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns, then returns None, for an unknown offset
            if len(name) == 9 and name[0] == "n" and name[1:].isdigit():
                syn = wn.synset_from_pos_and_offset("n", int(name[1:]))
            else:
                syn = wn.synset(name)
    except Exception:  # nltk raises WordNetError / ValueError for unknown names
        syn = None
    if syn is None:
        raise ValueError(f"unknown WordNet synset {name!r}: use a noun wnid like 'n01440764' or a name like "
                         "'apple.n.01'")
    return syn


def wnid_of(synset) -> str:
    """ImageNet-style wnid of a synset: POS letter + 8-digit offset."""
    return f"{synset.pos()}{synset.offset():08d}"


def _add_env_paths(nltk) -> None:
    """Honour a NLTK_DATA set after nltk was imported."""
    for p in reversed((settings.NLTK_DATA.get() or "").split(os.pathsep)):
        if p and p not in nltk.data.path:
            nltk.data.path.insert(0, p)
