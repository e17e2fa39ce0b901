"""Judges: what says whether a sampled image shows a concept, for evaluate, redteam and tune alike.

One interface (`ConceptJudge`), two judges:

* `TinyWorldJudge`: the tiny world's classifier (its 32-px images only): a concept's accuracy is the share of
  images that are not junk and match its classifier heads. The numbers are those of `evaluation.sampled_accuracy`
  and `evaluation.other_concepts_accuracy`, sample for sample.
* `ClipJudge`: CLIP zero-shot from a local CLIP folder, for any model: each image is assigned the label whose
  text embedding is closest to it, among every label of the run (the target's, its alternatives' and the other
  concepts'), and a concept's accuracy is the share of its images assigned to one of its own labels. The target,
  its alternatives and the other concepts come from a concept file (concepts/*.yaml, `load_concept_file`), or
  from evaluate's `--target PROMPT --versus PROMPT` (one prompt, one label each).

A run names its judge with a *judge spec*, a small JSON-able dict that travels to Ray trials: `{"kind": "tiny",
"target": "sunset"}` or `{"kind": "clip", "clip": "/abs/CLIP_DIR", "concepts": {...the checked concept file...}}`
(`judge_spec`). `load_judge(spec)` loads a judge once per process (the red team's trials reuse processes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .outputs import shown
from .concepts import Concept
from .metrics import ClassifierEmbedder, ClipZeroShot, check_embedder_folder, check_tokenizer_files
from .models.pipeline_io import config_resolution
from .outputs import check_plain_name
from .sampling import generate
from .specs import read_yaml
from .tinyworld.classifier import IMAGE_SIZE, Judge, concept_accuracy, concept_hits

TINY, CLIP = "tiny", "clip"
CONCEPT_KEYS = ("name", "prompts", "labels", "alternatives", "others")
OTHER_KEYS = ("name", "prompts", "labels")
MAX_CONCEPT_ITEMS = 1000  # prompts or labels per concept, other concepts per file
MAX_TEXT_CHARS = 1000


# concept files -----------------------------------------------------------------------------------------
def _texts(value, where: str, what: str, required: bool = True) -> list[str]:
    if value is None:
        if required:
            raise UserError(f"{where}: missing ({what})")
        return []
    if isinstance(value, str) or not isinstance(value, list):
        raise UserError(f"{where}: expected a list of {what}, got {shown(value)}")
    if required and not value:
        raise UserError(f"{where}: empty (expected at least one of {what})")
    if len(value) > MAX_CONCEPT_ITEMS:
        raise UserError(f"{where}: {len(value)} entries, at most {MAX_CONCEPT_ITEMS}")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{where}[{i}]: expected a non-empty text, got {shown(v)}")
        if len(v) > MAX_TEXT_CHARS or any(ord(c) < 32 for c in v):
            raise UserError(f"{where}[{i}]: {shown(v)}: at most {MAX_TEXT_CHARS} characters, no control characters")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: {shown(next(v for v in value if value.count(v) > 1))} is given twice")
    return [v.strip() for v in value]


def _name(value, where: str) -> str:
    if value is None:
        raise UserError(f"{where}: missing (the concept's name)")
    return check_plain_name(value, where)


def check_concepts(data, where: str, checked: bool = False) -> dict:
    """A concept file's content, checked strictly (every key known, every list of non-empty texts, no label used
    by two concepts, names different): {name, prompts, labels, alternatives, others: [{name, prompts, labels}]}.
    `where` prefixes every error line (the file's name); `checked`: content checked before, which may keep the
    file's path under "path" (a judge spec's, in a Ray trial)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with {', '.join(CONCEPT_KEYS)}")
    unknown = sorted(set(data) - set(CONCEPT_KEYS) - ({"path"} if checked else set()))
    if unknown:
        raise UserError(f"{where}: unknown key {shown(unknown[0])!r}; expected {', '.join(CONCEPT_KEYS)}")
    out = {"name": _name(data.get("name"), f"{where}: name"),
           "prompts": _texts(data.get("prompts"), f"{where}: prompts", "prompts that ask for the concept"),
           "labels": _texts(data.get("labels"), f"{where}: labels", "zero-shot labels of the concept"),
           "alternatives": _texts(data.get("alternatives"), f"{where}: alternatives",
                                  "zero-shot labels of what else its images may show", required=False)}
    others = data.get("others")
    if others is None:
        raise UserError(f"{where}: others: missing (the concepts legal use keeps, each with name, prompts and labels)")
    if not isinstance(others, list) or not others:
        raise UserError(f"{where}: others: expected a non-empty list of concepts (name, prompts, labels)")
    if len(others) > MAX_CONCEPT_ITEMS:
        raise UserError(f"{where}: others: {len(others)} concepts, at most {MAX_CONCEPT_ITEMS}")
    out["others"] = []
    for i, o in enumerate(others):
        at = f"{where}: others[{i}]"
        if not isinstance(o, dict):
            raise UserError(f"{at}: expected a mapping with name, prompts and labels, got {shown(o)}")
        bad = sorted(set(o) - set(OTHER_KEYS))
        if bad:
            raise UserError(f"{at}: unknown key {shown(bad[0])!r}; expected name, prompts, labels")
        out["others"].append({"name": _name(o.get("name"), f"{at}.name"),
                              "prompts": _texts(o.get("prompts"), f"{at}.prompts", "prompts that ask for it"),
                              "labels": _texts(o.get("labels"), f"{at}.labels", "its zero-shot labels")})
    names = [out["name"]] + [o["name"] for o in out["others"]]
    for n in names:
        if names.count(n) > 1:
            raise UserError(f"{where}: the concept name {shown(n)} is used twice")
    owner: dict[str, str] = {}
    for key, labels in [("labels", out["labels"]), ("alternatives", out["alternatives"]),
                        *((f"others[{i}].labels", o["labels"]) for i, o in enumerate(out["others"]))]:
        for label in labels:
            if label in owner:
                raise UserError(f"{where}: {key}: the label {shown(label)} is also in {owner[label]} (an image "
                                "closest to it would count for both)")
            owner[label] = key
    if checked and isinstance(data.get("path"), str):
        out["path"] = data["path"]
    return out


def load_concept_file(path, flag: str = "--concepts") -> dict:
    """A concept file (YAML), checked (`check_concepts`); its absolute path is kept under "path"."""

    path = Path(path).expanduser()
    concepts = check_concepts(read_yaml(path, flag), f"{flag} {shown(str(path))}")
    concepts["path"] = str(path.resolve())
    return concepts


# judge specs -------------------------------------------------------------------------------------------
def parse_judge(value: str | None, flag: str = "--judge") -> tuple[str, Path | None]:
    """`tiny` or `clip:DIR` (None: tiny) -> (kind, CLIP folder or None)."""
    if value is None or value == TINY:
        return TINY, None
    if not isinstance(value, str):
        raise UserError(f"{flag} {shown(value)}: expected tiny or clip:DIR")
    kind, sep, rest = value.partition(":")
    if kind == CLIP and sep and rest:
        return CLIP, Path(rest).expanduser()
    raise UserError(f"{flag} {shown(value)}: expected tiny (the tiny world's classifier) or clip:DIR (CLIP zero-shot "
                    "from a local CLIP folder, with a concept file)")


def judge_spec(judge: str | None, concepts, target: str | None, flag: str = "--judge",
               concepts_flag: str = "--concepts", target_flag: str = "--target") -> dict:
    """The judge spec of a run, checked before anything runs: the tiny world's classifier on a tiny-world concept
    (`target`), or CLIP zero-shot from a local CLIP folder (checked to be one, from its config) on the concepts
    of a concept file (`concepts`: a path, or its already-checked content). `target`, where given with a concept
    file, must be the file's `name`."""
    kind, folder = parse_judge(judge, flag)
    if kind == TINY:
        if concepts is not None:
            raise UserError(f"{concepts_flag}: a concept file is read by the CLIP judge ({flag} clip:DIR); the tiny "
                            f"world's classifier judges the tiny-world concept given by {target_flag}")
        if target is None:
            raise UserError(f"{target_flag}: the tiny-world concept to judge is needed (or {flag} clip:DIR "
                            f"{concepts_flag} FILE for any model)")
        from .concepts import tiny_world_target

        tiny_world_target(target)  # a tiny-world concept
        return {"kind": TINY, "target": target}
    if concepts is None:
        raise UserError(f"{flag} {shown(judge)}: the CLIP judge needs {concepts_flag} FILE (the target's prompts and "
                        "labels, its alternatives, the other concepts; see concepts/)")
    check_clip_folder(folder, f"{flag} {shown(judge)}")
    content = (check_concepts(concepts, f"{concepts_flag} {shown(concepts.get('path', 'mapping'))}", checked=True)
               if isinstance(concepts, dict) else load_concept_file(concepts, concepts_flag))
    if target is not None and target != content["name"]:
        raise UserError(f"{target_flag} {shown(target)}: the concept file names its target "
                        f"{shown(content['name'])!r} (give that, or leave {target_flag} out)")
    return {"kind": CLIP, "clip": str(folder.resolve()), "concepts": content}


def check_clip_folder(folder: Path, flag: str) -> None:
    """A local CLIP folder the judge can load, checked without its weights: a CLIPModel config (both towers),
    safetensors weights, and a tokenizer for the labels (found now, not in the first trial)."""

    check_embedder_folder("clip", folder, flag=flag)
    check_tokenizer_files(folder, flag)


def spec_target(spec: dict | None) -> str | None:
    """The name of the concept a judge spec protects."""
    if not spec:
        return None
    return spec["target"] if spec["kind"] == TINY else spec["concepts"]["name"]


def spec_inputs(spec: dict | None, flag: str = "--judge", concepts_flag: str = "--concepts") -> list[tuple[str, Path]]:
    """The paths a judge reads (an output must stay apart from them)."""
    if not spec or spec["kind"] != CLIP:
        return []
    out = [(flag, Path(spec["clip"]))]
    return out + ([(concepts_flag, Path(spec["concepts"]["path"]))] if spec["concepts"].get("path") else [])


def check_judge_model(spec: dict | None, model: Path, flag: str) -> None:
    """A model the judge can score: the tiny world's classifier judges the tiny world's 32-px images only (any
    other model is refused in one line, pointing at the CLIP judge); CLIP judges any model."""
    if spec is None or spec["kind"] == TINY:

        check_tiny_world_judge(Path(model), flag, hint="--judge clip:DIR --concepts FILE")


# judges ------------------------------------------------------------------------------------------------
def cycled(prompts: list[str], n: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]


class ConceptJudge:
    """Accuracy of images on concepts. `target` (the protected concept) and `others` (the concepts legal use
    keeps) are set for a judge bound to a run (redteam, tune); evaluate passes its own concepts to `accuracy`."""

    kind = "judge"
    target = None
    others: list = []

    def hits(self, images: np.ndarray, concept) -> np.ndarray:
        """The verdict on each image: does it show `concept`?"""
        raise NotImplementedError

    def accuracy(self, images: np.ndarray, concept) -> float:
        """The share of images that show `concept`."""
        hits = self.hits(images, concept)
        return float(np.mean(hits)) if len(hits) else 0.0

    def target_accuracy(self, images: np.ndarray) -> float:
        return self.accuracy(images, self.target)

    def others_accuracy(self, images_by_concept: dict[str, np.ndarray]) -> float | None:
        """The mean accuracy over the other concepts, each on its own images (by concept name)."""
        accs = [self.accuracy(images_by_concept[c.name], c) for c in self.others]
        return float(np.mean(accs)) if accs else None

    def prompts(self, concept=None) -> list[str]:
        """The prompts that ask for a concept (default: the target)."""
        return list((concept or self.target).prompts)

    def sampled_accuracy(self, pipe, concept, n: int, seed: int = 0, steps: int = 25, to_prompt=None) -> float:
        """Accuracy of n images sampled from the concept's prompts (cycled); `to_prompt` rewrites each prompt as
        the attacker writes it (textual inversion: its new token, `attacks.loading.attacked_prompt`)."""

        prompts = cycled(list(concept.prompts), n)
        if to_prompt is not None:
            prompts = [to_prompt(p) for p in prompts]
        return self.accuracy(generate(pipe, prompts, steps=steps, seed=seed), concept)

    def sampled_target_accuracy(self, pipe, n: int, seed: int = 0, steps: int = 25, to_prompt=None) -> float:
        return self.sampled_accuracy(pipe, self.target, n, seed, steps, to_prompt)

    def sampled_others_accuracy(self, pipe, n: int, seed: int = 1, steps: int = 25, to_prompt=None) -> float:
        """The mean over the other concepts, n images each, every concept sampled with the same seed."""
        return float(np.mean([self.sampled_accuracy(pipe, c, n, seed, steps, to_prompt) for c in self.others]))


class TinyWorldJudge(ConceptJudge):
    """The tiny world's classifier; bound to a tiny-world `target` (its prompts and criterion, and the trained
    styles and shapes but the target as the other concepts), or unbound (evaluate's concepts)."""

    kind = TINY

    def __init__(self, target: str | None = None, classifier=None, token: str = "sks"):
        self.classifier = classifier if isinstance(classifier, Judge) else Judge(classifier)
        if target is not None:
            from .concepts import tiny_world_others, tiny_world_target

            self.target, _ = tiny_world_target(target, token)
            self.others = tiny_world_others(target)

    def hits(self, images: np.ndarray, concept) -> np.ndarray:
        return concept_hits(self.classifier(images), **concept.criterion)

    def accuracy(self, images: np.ndarray, concept) -> float:
        return concept_accuracy(self.classifier(images), **concept.criterion)  # evaluation.sampled_accuracy's

    @property
    def embedder(self):
        return ClassifierEmbedder(self.classifier)


def concept_labels(concept) -> list[str]:
    """A CLIP-judged concept's own labels (a concept file's `labels`, or evaluate's one prompt)."""
    c = concept.criterion
    return list(c["labels"]) if "labels" in c else [c["label"]]


class ClipJudge(ConceptJudge):
    """CLIP zero-shot over every label of the run: an image counts for a concept when its closest label is one of
    the concept's own."""

    kind = CLIP

    def __init__(self, zero_shot, target=None, others=()):
        self.zero_shot, self.target, self.others = zero_shot, target, list(others)

    @classmethod
    def from_concepts(cls, folder, concepts: dict, flag: str = "--judge") -> "ClipJudge":
        """The judge of a concept file's content (`check_concepts`)."""

        target = Concept(concepts["name"], list(concepts["prompts"]), {"labels": list(concepts["labels"])})
        others = [Concept(o["name"], list(o["prompts"]), {"labels": list(o["labels"])}) for o in concepts["others"]]
        labels = [*concepts["labels"], *concepts["alternatives"], *(x for o in concepts["others"] for x in o["labels"])]
        return cls(ClipZeroShot(Path(folder), labels, flag=flag), target, others)

    @classmethod
    def from_prompts(cls, folder, targets: list[str], versus: list[str], flag: str = "--clip") -> "ClipJudge":
        """evaluate's `--target PROMPT --versus PROMPT`: one prompt and one label per concept (unbound: evaluate
        passes its concepts, `evaluation.prompt_concepts`)."""
        from .metrics import ClipZeroShot

        return cls(ClipZeroShot(Path(folder), [*targets, *versus], flag=flag))

    @property
    def labels(self) -> list[str]:
        return self.zero_shot.labels

    @property
    def embedder(self):
        return self.zero_shot.images

    def hits(self, images: np.ndarray, concept) -> np.ndarray:
        return self.zero_shot.label_hits(images, concept_labels(concept))


def as_concept_judge(judge, target: str | None = None):
    """A ConceptJudge as it is; the tiny world's classifier (`tinyworld.classifier.Judge`) as a TinyWorldJudge
    (bound to `target` where given); a bare `metrics.ClipZeroShot` as an unbound ClipJudge; None as None."""
    if judge is None or isinstance(judge, ConceptJudge):
        return judge
    from .metrics import ClipZeroShot

    if isinstance(judge, ClipZeroShot):
        return ClipJudge(judge)
    return TinyWorldJudge(target, classifier=judge)


def judge_key(spec: dict | None) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


_LOADED: dict = {}  # per process: each judge spec's judge, and each classifier / CLIP folder's model


def load_judge(spec: dict | None, flag: str = "--judge"):
    """The judge of a spec (`judge_spec`), loaded once per process. None: the tiny world's classifier alone
    (unbound; `as_concept_judge` binds it to a concept)."""
    key = judge_key(spec)
    if key in _LOADED:
        return _LOADED[key]
    if spec is None:
        from .tinyworld.classifier import Judge

        judge = Judge()
    elif spec["kind"] == TINY:
        judge = TinyWorldJudge(spec["target"], classifier=load_judge(None))
    elif spec["kind"] == CLIP:
        judge = ClipJudge.from_concepts(spec["clip"], spec["concepts"], flag=f"{flag} clip:{spec['clip']}")
    else:
        raise UserError(f"{flag}: unknown judge kind {shown(spec.get('kind'))}")
    _LOADED[key] = judge
    return judge


def describe(spec: dict | None) -> dict:
    """The judge as a report records it: its kind, and for CLIP the folder and the concept file."""
    if not spec or spec["kind"] == TINY:
        return {"kind": TINY}
    return {"kind": CLIP, "clip": spec["clip"], "concepts": spec["concepts"].get("path")}


def check_tiny_world_judge(path: Path, flag: str,
                           hint: str = "--clip DIR --versus PROMPT, or --clip DIR --concepts FILE") -> None:
    """The tiny world's classifier judges its 32-px images only: on any other model every accuracy would be
    0 and mean nothing, so such a model is refused in one line instead of scored. `hint`: the caller's flags
    for the CLIP judge, which scores any model."""

    size = config_resolution(path)
    if size is not None and size != IMAGE_SIZE:
        raise UserError(f"{flag}: the model makes {size}-px images; concepts are scored with the tiny world's "
                        f"{IMAGE_SIZE}-px classifier, which cannot judge them (any model is scored by CLIP "
                        f"zero-shot: {hint})")
