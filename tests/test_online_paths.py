"""The online code paths, run offline: what a Colab reader runs, minus the network.

``qtutor.load_model("Qwen/Qwen2-0.5B")`` and ``wikitext2_text()`` (no data_dir:
``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=...)``) run unchanged, in a fresh
interpreter, with ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``, against caches laid out as a
first online run leaves them:

* the hub cache (``HF_HUB_CACHE``): ``models--Qwen--Qwen2-0.5B/{refs/main, blobs/<etag>,
  snapshots/<sha>/<file> -> ../../blobs/<etag>}``. Qwen2-0.5B's weights cannot be had here, so
  the snapshot holds a tiny Qwen2 with random weights (``save_pretrained``) and the embedded
  model's tokenizer files;
* the datasets cache (``HF_DATASETS_CACHE``): ``wikitext/wikitext-2-raw-v1/0.0.0/<sha>/``
  (``dataset_info.json``, ``wikitext-{test,validation}.arrow``). Offline, ``datasets`` (3.x to
  5.x) does not look at the hub cache for a dataset at all: ``dataset_module_factory`` raises
  for offline mode and falls back to ``CachedDatasetModuleFactory``, which reads this folder
  (named after the dataset name given, ``wikitext``) through the ``cache`` builder. The folder is
  written here by ``load_dataset`` itself, from a copy of the Hub repository (README.md with
  its ``configs`` and the parquet files) in a folder named ``wikitext``: the same builder
  (parquet), dataset name, config and file names as the online load writes.

The data come from the WikiText-2 parquet fixture (``$QTUTOR_WIKITEXT`` or ``../shared`` beside
the clone) when it is there, else from a small synthetic parquet in the same layout.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtutor.models import embedded_model_dir

HUB_ID = "Qwen/Qwen2-0.5B"
SHA = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id; the caches only need one
SPLITS = ("test", "validation")


def wikitext_fixture():
    env = os.environ.get("QTUTOR_WIKITEXT")
    candidates = ([Path(env)] if env else []) + [
        Path(__file__).resolve().parents[2] / "shared" / "data" / "hf-wikitext"
    ]
    for d in candidates:
        if all((d / "wikitext-2-raw-v1" / f"{s}-00000-of-00001.parquet").is_file() for s in SPLITS):
            return d
    return None


SYNTHETIC = {  # the Hub's row layout: one row per line, newline kept, blank lines as ""
    "test": [
        "",
        " = Valkyria Chronicles III = \n",
        "",
        " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) , commonly referred to as ... \n",
        "",
        " = = Gameplay = = \n",
        "",
        " It costs £ 1 @,@ 000 – about 5 @.@ 5 % . \n",
    ],
    "validation": ["", " = Homarus gammarus = \n", "", " Homarus gammarus , known as the European lobster \n"],
}
README = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
"""


def write_synthetic(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "wikitext-2-raw-v1").mkdir(parents=True)
    (folder / "README.md").write_text(README, encoding="utf-8")
    for split, rows in SYNTHETIC.items():
        pq.write_table(pa.table({"text": rows}), folder / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    return folder


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(hub_cache: Path, repo_id: str, files: Path, sha: str) -> Path:
    """``files`` (a folder) as huggingface_hub's cache holds a snapshot of model ``repo_id``:
    blobs named by etag (sha256 for LFS files, the git blob id otherwise), the snapshot's
    files relative links to them (copies where links cannot be made), refs/main = sha."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)  # no newline, as huggingface_hub writes it
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        try:
            os.symlink(Path("..", "..", "blobs", etag), snapshot / f.name)
        except OSError:
            shutil.copyfile(repo / "blobs" / etag, snapshot / f.name)
    return snapshot


def prime_datasets_cache(datasets_cache: Path, repo_copy: Path, sha: str) -> Path:
    """``load_dataset`` of the repository copy (a folder named ``wikitext``) writes the cache
    folder an online ``load_dataset("wikitext", "wikitext-2-raw-v1")`` writes; its last part,
    the hash, is the Hub commit id online, so it is renamed to one."""
    import datasets

    assert repo_copy.name == "wikitext"
    datasets.load_dataset(str(repo_copy), "wikitext-2-raw-v1", cache_dir=str(datasets_cache))
    written = [d for d in (datasets_cache / "wikitext" / "wikitext-2-raw-v1").glob("*/*") if d.is_dir()]
    assert len(written) == 1 and (written[0] / "wikitext-test.arrow").is_file(), written
    for f in written[0].parent.glob(written[0].name + "*"):  # the folder and its lock files
        f.rename(f.with_name(sha + f.name[len(written[0].name) :]))
    return written[0].with_name(sha)


CHILD = r"""
import json, sys, torch
from pathlib import Path
import qtutor
from qtutor.data import dataset_text, wikitext2_text
from qtutor.errors import QtutorError
from qtutor.models import embedded_model_dir
out = Path(sys.argv[1])
model, tok = qtutor.load_model("Qwen/Qwen2-0.5B")
text = (embedded_model_dir() / "heldout.txt").read_text(encoding="utf-8")[:2000]
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
torch.save({"ids": ids, "logits": logits}, out / "model.pt")
info = {"class": type(model).__name__, "tokenizer": type(tok).__name__,
        "dtype": str(next(model.parameters()).dtype), "training": model.training,
        "hidden_size": model.config.hidden_size, "rope": getattr(model.config, "rope_parameters", None)}
(out / "test.txt").write_bytes(wikitext2_text().encode("utf-8"))            # split="test"
(out / "validation.txt").write_bytes(dataset_text("wikitext2", "calib").encode("utf-8"))
try:  # a Hub id that is not in the cache: the friendly error, no network
    qtutor.load_model("Qwen/Qwen2-1.5B")
    info["missing"] = "loaded"
except QtutorError as err:
    info["missing"] = str(err)
(out / "info.json").write_text(json.dumps(info))
"""


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen2Config

    tmp = tmp_path_factory.mktemp("online")
    # the "Qwen/Qwen2-0.5B" snapshot: tiny random Qwen2 + the embedded model's tokenizer
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=1e6,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    files = tmp / "model"
    model.save_pretrained(files)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(embedded_model_dir() / name, files / name)
    write_hub_cache(tmp / "hub", HUB_ID, files, SHA)

    # the "wikitext" dataset: the fixture's (or synthetic) parquet files in the Hub repo layout
    fixture = wikitext_fixture()
    source = fixture if fixture is not None else write_synthetic(tmp / "synthetic")
    repo_copy = tmp / "repo" / "wikitext"
    (repo_copy / "wikitext-2-raw-v1").mkdir(parents=True)
    shutil.copyfile(source / "README.md", repo_copy / "README.md")
    for s in SPLITS:
        name = f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet"
        shutil.copyfile(source / name, repo_copy / name)
    prime_datasets_cache(tmp / "datasets", repo_copy, SHA)

    out = tmp / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.pop("QTUTOR_WIKITEXT", None)  # no data_dir: the Hub path
    env.update(
        HF_HOME=str(tmp / "home"),
        HF_HUB_CACHE=str(tmp / "hub"),
        HF_DATASETS_CACHE=str(tmp / "datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # should anything still try the network, it fails at once
        HF_HUB_DISABLE_TELEMETRY="1",
        TQDM_DISABLE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(
        out=out, model=model, source=source, synthetic=fixture is None, info=json.loads((out / "info.json").read_text())
    )


def test_hub_id_loads_from_the_hub_cache_offline(offline_run):
    from transformers import PreTrainedTokenizerFast

    info, saved = offline_run["info"], torch.load(offline_run["out"] / "model.pt")
    assert info["class"] == "Qwen2ForCausalLM" and info["hidden_size"] == 64
    assert info["dtype"] == "torch.float32" and info["training"] is False
    # the tokenizer is the snapshot's (the embedded one), and the weights are the ones written
    text = (embedded_model_dir() / "heldout.txt").read_text(encoding="utf-8")[:2000]
    ref_ids = PreTrainedTokenizerFast.from_pretrained(embedded_model_dir())(text, return_tensors="pt").input_ids
    assert torch.equal(saved["ids"], ref_ids)
    with torch.no_grad():
        ref = offline_run["model"](ref_ids).logits
    assert torch.equal(saved["logits"], ref)
    # an id missing from the cache: qtutor's one-line error, not a traceback or a download
    assert info["missing"] != "loaded" and "Qwen/Qwen2-1.5B" in info["missing"], info["missing"]


@pytest.mark.parametrize("split", SPLITS)
def test_wikitext_loads_from_the_datasets_cache_offline(offline_run, split):
    from qtutor.data import wikitext2_text

    got = (offline_run["out"] / f"{split}.txt").read_bytes()
    # byte for byte what the local-folder path (data_dir) gives for the same files
    assert got == wikitext2_text(split, data_dir=str(offline_run["source"])).encode("utf-8")
    # and the rows of the parquet file itself, joined as the GPTQ papers join them
    import pyarrow.parquet as pq

    rows = pq.read_table(offline_run["source"] / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    assert got == "\n\n".join(rows.column("text").to_pylist()).encode("utf-8")
    if offline_run["synthetic"]:
        assert got == "\n\n".join(SYNTHETIC[split]).encode("utf-8")
    else:  # the real WikiText-2 splits: 4358 and 3760 rows
        assert rows.num_rows == {"test": 4358, "validation": 3760}[split]
