"""Hugging Face datasets as a data source (``--data-root hf:...``) and as an export format (``--format hf``).

Every dataset is built here, with the published column and split names of each task's best-known hub counterpart
(superb ks/ic/si/er/asr, google/speech_commands v0.01, openslr/librispeech_asr), and saved to disk: nothing is
downloaded.
"""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, ClassLabel, Value
from helpers import error_line
from test_asr import SMALL_ASR
from test_asv import SMALL_ASV
from test_pr import SMALL_PR

import speechbench.downstreams.hf_data as hf_data
from speechbench.benchmark.cli import main
from speechbench.benchmark.config import ConfigError
from speechbench.benchmark.run import RunRequest, resolve_config
from speechbench.benchmark.sweep import load_sweep
from speechbench.downstreams.data import DataError, load_utterance_audio, read_manifest, row_reference
from speechbench.downstreams.hf_data import Column, build_dataset, save_dataset_dict
from speechbench.downstreams.synth.export import export_hf
from speechbench.downstreams.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread", "hf_cache")

SUPERB_KS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_"]
SC_V001 = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one", "two", "three", "four",
           "five", "six", "seven", "eight", "nine", "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila",
           "tree", "wow", "_silence_"]
SMALL = ("train.max_steps=2", "train.eval_every=2", "train.batch_size=4")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """load_dataset("parquet" ...) converts into the datasets cache: keep it inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def wav_bytes(seconds: float, seed: int, rate: int = 16000, channels: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    shape = (int(rate * seconds), channels) if channels > 1 else int(rate * seconds)
    sf.write(buf, (0.1 * rng.standard_normal(shape)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_column(files, seconds, seed: int = 0) -> Column:
    return Column([{"bytes": wav_bytes(s, seed + i), "path": Path(f).name} for i, (f, s) in
                   enumerate(zip(files, seconds, strict=True))], Audio(sampling_rate=16000))


def save(tmp_path: Path, name: str, splits: dict) -> str:
    save_dataset_dict(splits, tmp_path / name)
    return f"hf:{tmp_path / name}"


# ---------------------------------------------------------------------------------------------- published layouts

def superb_ks(tmp_path: Path, dev_silence: bool = False) -> str:
    """superb ks: file, audio, label; train holds a long _background_noise_ recording labelled _silence_."""
    def split(name, labels, noise_s=0.0):
        files = [f"/data/{lab}/{name}{i:02d}_nohash_0.wav" for i, lab in enumerate(labels)]
        seconds = [1.0] * len(labels)
        if noise_s:
            files.append("/data/_background_noise_/white_noise.wav")
            labels, seconds = labels + ["_silence_"], seconds + [noise_s]
        return build_dataset({"file": Column(files), "audio": audio_column(files, seconds, len(name)),
                              "label": Column(labels, ClassLabel(names=SUPERB_KS))})
    words = ["yes", "no", "up", "down", "_unknown_", "go"]
    return save(tmp_path, "superb-ks", {
        "train": split("a", words * 2, noise_s=12.5), "validation": split("b", words, noise_s=3.0 if dev_silence
                                                                          else 0.0),
        "test": split("c", words + ["_silence_"])})


def speech_commands(tmp_path: Path) -> str:
    """google/speech_commands v0.01: the 30 words + _silence_ as a ClassLabel, is_unknown, speaker_id, utterance_id."""
    def split(name, labels):
        files = [f"{lab}/{name}{i:02d}_nohash_0.wav" for i, lab in enumerate(labels)]
        return build_dataset({
            "file": Column(files), "audio": audio_column(files, [3.0 if lab == "_silence_" else 1.0 for lab in labels]),
            "label": Column(labels, ClassLabel(names=SC_V001)),
            "is_unknown": Column([lab not in SUPERB_KS for lab in labels], Value("bool")),
            "speaker_id": Column([None if lab == "_silence_" else f"{name}{i:02d}" for i, lab in enumerate(labels)]),
            "utterance_id": Column([0] * len(labels), Value("int8"))})
    return save(tmp_path, "speech_commands", {"train": split("a", ["yes", "cat", "no", "_silence_"]),
                                              "validation": split("b", ["yes", "wow", "_silence_"]),
                                              "test": split("c", ["yes", "tree", "no"])})


def superb_ic(tmp_path: Path) -> str:
    actions, objects = ["activate", "bring", "decrease"], ["lights", "shoes", "volume"]
    def split(name, n):
        files = [f"/fsc/wavs/speakers/spk{i % 2}/{name}-{i}.wav" for i in range(n)]
        return build_dataset({
            "file": Column(files), "audio": audio_column(files, [1.0 + 0.1 * i for i in range(n)]),
            "speaker_id": Column([f"spk{i % 2}" for i in range(n)]), "text": Column(["turn it up"] * n),
            "action": Column([actions[i % 3] for i in range(n)], ClassLabel(names=actions)),
            "object": Column([objects[(i + 1) % 3] for i in range(n)], ClassLabel(names=objects)),
            "location": Column(["none"] * n, ClassLabel(names=["bedroom", "kitchen", "none", "washroom"]))})
    return save(tmp_path, "superb-ic", {"train": split("a", 6), "validation": split("b", 3), "test": split("c", 3)})


def superb_si(tmp_path: Path) -> str:
    speakers = [f"id{10001 + k}" for k in range(3)]
    def split(name, n):
        files = [f"/vox/wav/{speakers[i % 3]}/{name}video/{i:05d}.wav" for i in range(n)]
        return build_dataset({"file": Column(files), "audio": audio_column(files, [1.0] * n),
                              "label": Column([speakers[i % 3] for i in range(n)], ClassLabel(names=speakers))})
    return save(tmp_path, "superb-si", {"train": split("a", 6), "validation": split("b", 3), "test": split("c", 3)})


def superb_er(tmp_path: Path, labels=("neu", "hap", "ang", "sad"), extra: dict | None = None) -> str:
    def session(k):
        names = [f"Ses0{k}F_impro0{i}_{'FM'[i % 2]}00{i}" for i in range(4)]
        files = [f"/iemocap/Session{k}/sentences/wav/{n.rsplit('_', 1)[0]}/{n}.wav" for n in names]
        return build_dataset({"file": Column(files), "audio": audio_column(files, [1.0] * 4, k),
                              "label": Column([labels[i % len(labels)] for i in range(4)],
                                              ClassLabel(names=list(labels)))})
    return save(tmp_path, "superb-er", {f"session{k}": session(k) for k in range(1, 6)} | (extra or {}))


def librispeech(tmp_path: Path, splits=("train", "validation", "test"), name: str = "superb-asr") -> str:
    """superb asr (train/validation/test) or librispeech_asr clean (train.100/validation/test): file, audio, text,
    speaker_id, chapter_id, id."""
    texts = ["THE CAT RAN", "HELLO DOG", "THE DOG SAT"]
    def split(k, n):
        ids = [f"{100 + k}-{200 + k}-{i:04d}" for i in range(n)]
        return build_dataset({
            "file": Column([f"/ls/{i}.flac" for i in ids]),
            "audio": audio_column(ids, [1.0 + 0.2 * i for i in range(n)]),
            "text": Column([texts[i % 3] for i in range(n)]), "speaker_id": Column([100 + k] * n),
            "chapter_id": Column([200 + k] * n), "id": Column(ids)})
    return save(tmp_path, name, {s: split(k, 4 if k == 0 else 2) for k, s in enumerate(splits)})


def voxceleb(tmp_path: Path) -> str:
    """VoxCeleb-style: train (development speakers) and test (trial speakers), speaker_id, file <spk>/<video>/<utt>."""
    def split(speakers, n):
        files = [f"{s}/vid{v}/{u:05d}.wav" for s in speakers for v in range(2) for u in range(n)]
        return build_dataset({"file": Column(files), "audio": audio_column(files, [2.5] * len(files)),
                              "speaker_id": Column([f.split("/")[0] for f in files])})
    root = save(tmp_path, "voxceleb", {"train": split([f"id100{k:02d}" for k in range(1, 7)], 2),
                                       "test": split(["id10270", "id10271"], 1)})
    (tmp_path / "voxceleb" / "veri_test.txt").write_text(
        "1 id10270/vid0/00000.wav id10270/vid1/00000.wav\n0 id10270/vid0/00000.wav id10271/vid0/00000.wav\n"
        "1 id10271/vid0/00000.wav id10271/vid1/00000.wav\n0 id10271/vid1/00000.wav id10270/vid1/00000.wav\n")
    return root


def _prepare(task: str, root: str, *overrides: str):
    t = get_task(task)
    cfg = resolve_config(RunRequest(upstream="fbank_no_cmvn", task=task, data_root=root, overrides=overrides), t)
    return t.prepare(cfg.data, cfg.task_options)


def _run(tmp_path: Path, task: str, root: str, *overrides: str) -> dict:
    """``bench run --data-root hf:...`` (the task's superb recipe, a few steps) -> its result."""
    fold = ["--fold", "1"] if task == "er" else []
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", task, "--data-root", root, *fold, "--out",
                 str(tmp_path / "out"), *SMALL, *overrides]) == 0
    (path,) = (tmp_path / "out" / "fbank_no_cmvn" / task).glob("*/result.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- the seven tasks

def test_ks_runs_on_superb_ks_with_its_silence_recordings_cut_as_the_native_layout(tmp_path):
    root = superb_ks(tmp_path)
    result = _run(tmp_path, "ks", root)
    run_dir = next((tmp_path / "out" / "fbank_no_cmvn" / "ks").iterdir())
    manifests = {s: read_manifest(run_dir / "manifests" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    keywords = {s: sorted({u.labels["keyword"] for u in utts}) for s, utts in manifests.items()}
    assert keywords["test"] == ["_silence_", "_unknown_", "down", "go", "no", "up", "yes"]
    # the 12.5 s recording: 12 one-second crops, split between train and dev by the native hash rule
    crops = [u for utts in manifests.values() for u in utts if "#" in u.id]
    assert len(crops) == 12 and {u.duration_s for u in crops} == {1.0} and {u.speaker for u in crops} == {"noise"}
    assert sorted(u.labels["offset_s"] for u in crops) == [float(k) for k in range(12)]
    assert {u.id.split("#")[0] for u in crops} == {"_background_noise_/white_noise"}
    to_dev = [k for k in range(12) if int(hashlib.sha1(f"white_noise.wav#{k}".encode()).hexdigest(), 16) % 10 == 0]
    assert sorted(int(u.labels["offset_s"]) for u in crops if u.split == "dev") == to_dev
    assert {u.split for u in crops} == ({"train", "dev"} if to_dev else {"train"})
    # ids keep <word>/<file> of the file column, speakers its _nohash_ prefix, the real corpus' -3 dB gain applies
    first = manifests["train"][0]
    assert first.id == "yes/a00_nohash_0" and first.speaker == "a00" and first.labels["gain_db"] == -3.0
    row = json.loads((run_dir / "manifests" / "train.jsonl").read_text().splitlines()[0])
    assert (row["audio_root"], row["path"]) == (str(tmp_path / "superb-ks"), "train/data-00000-of-00001.arrow#audio:0")
    assert row_reference(first.path) == (tmp_path / "superb-ks" / "train" / "data-00000-of-00001.arrow", "audio", 0)
    assert result["data"]["corpus"] == "hf:superb-ks" and result["data"]["gain_db"] == -3.0
    hf = result["protocol"]["hf_dataset"]
    assert hf["splits"] == {"train": ["train"], "dev": ["validation"], "test": ["test"]}
    assert hf["columns"] == {"audio": "audio", "file": "file", "keyword": "label"}
    assert "hash rule" in hf["notes"][0] and not any("Hugging Face" in d for d in result["protocol"]["deviations"])
    # the run's manifests are usable on their own: bench extract reads the dataset rows they reference
    assert main(["extract", "--upstream", "fbank_no_cmvn", "--data", str(run_dir / "manifests" / "test.jsonl"),
                 "--out", str(tmp_path / "feats")]) == 0
    assert len(list((tmp_path / "feats").rglob("*.safetensors"))) == len(manifests["test"]) == 7


def test_ks_on_speech_commands_maps_auxiliary_words_and_records_its_silence_split(tmp_path):
    prepared = _prepare("ks", speech_commands(tmp_path))
    labels = {s: [(u.id, u.labels["keyword"]) for u in utts] for s, utts in prepared.splits.items()}
    assert labels["train"][:3] == [("yes/a00_nohash_0", "yes"), ("cat/a01_nohash_0", "_unknown_"),
                                   ("no/a02_nohash_0", "no")]
    # each split's 3 s noise clip gives three crops that stay in their split
    assert [i for i, k in labels["dev"] if k == "_silence_"] == [f"_silence_/b02_nohash_0#{k}" for k in range(3)]
    assert [k for _, k in labels["test"]] == ["yes", "_unknown_", "no"]
    assert prepared.splits["train"][0].speaker == "a00"  # the speaker_id column
    assert "dataset's own division" in prepared.info["hf"]["deviations"][0]


def test_ic_runs_on_superb_ic(tmp_path):
    result = _run(tmp_path, "ic", superb_ic(tmp_path))
    assert result["metric"] == "accuracy" and result["protocol"]["test_official"] == 3793
    assert "scored 3 of the 3793 official test items" in result["protocol"]["deviations"]
    prepared = _prepare("ic", superb_ic(tmp_path / "again"))
    assert prepared.label_space == (("activate", "bring", "decrease"), ("lights", "shoes", "volume"), ("none",))
    u = prepared.splits["train"][1]
    assert (u.id, u.speaker, u.labels) == ("a-1", "spk1", {"action": "bring", "object": "volume", "location": "none",
                                                           "text": "turn it up"})


def test_sid_runs_on_superb_si(tmp_path):
    result = _run(tmp_path, "sid", superb_si(tmp_path))
    assert result["metric"] == "accuracy" and result["protocol"]["test_official"] == 8251
    prepared = _prepare("sid", superb_si(tmp_path / "again"))
    assert prepared.label_space == ("id10001", "id10002", "id10003")
    u = prepared.splits["test"][2]
    assert (u.id, u.speaker, u.labels["label"]) == ("id10003/cvideo/00002", "id10003", "id10003")


def test_er_runs_on_superb_er_sessions_as_folds(tmp_path):
    result = _run(tmp_path, "er", superb_er(tmp_path))
    assert result["fold"] == 1 and result["protocol"]["hf_dataset"]["splits"]["fold3"] == ["session3"]
    assert result["protocol"]["hf_dataset"]["notes"] == ["folds: one split per session"]
    prepared = _prepare("er", superb_er(tmp_path / "again"), "task_options.fold=2")
    assert {u.labels["fold"] for u in prepared.splits["test"]} == {2}
    assert {u.id[:5] for u in prepared.splits["test"]} == {"Ses02"} and len(prepared.splits["test"]) == 4
    u = prepared.splits["test"][1]
    assert (u.id, u.speaker, u.labels["emotion"]) == ("Ses02F_impro01_M001", "Ses02M", "hap")  # IEMOCAP speaker


def test_er_merges_excited_and_drops_other_emotions_from_a_session_column(tmp_path):
    files = [f"/x/utt{i}.wav" for i in range(10)]
    labels = ["neutral", "excited", "frustrated", "angry", "sad"] * 2
    ds = build_dataset({"file": Column(files), "audio": audio_column(files, [1.0] * 10), "emotion": Column(labels),
                        "session": Column([f"Session{1 + i // 2}" for i in range(10)])})
    prepared = _prepare("er", save(tmp_path, "iemocap", {"train": ds}), "task_options.fold=3")
    assert [(u.id, u.labels["emotion"]) for u in prepared.splits["test"]] == [("utt4", "sad"), ("utt5", "neu")]
    assert prepared.info["hf"]["dropped_labels"] == {"frustrated": 2}
    assert prepared.info["hf"]["notes"][0] == "folds: the session column 'session' of every split"


@pytest.mark.parametrize("task", ["asr", "pr"])
def test_librispeech_tasks_run_on_superb_asr_and_librispeech_asr(tmp_path, task):
    small = {"asr": SMALL_ASR, "pr": SMALL_PR}[task]
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("THE DH AH0\nCAT K AE1 T\nRAN R AE1 N\nHELLO HH AH0 L OW1\nDOG D AO1 G\nSAT S AE1 T\n")
    extra = (f"task_options.lexicon={lexicon}",) if task == "pr" else ()
    result = _run(tmp_path, task, librispeech(tmp_path), *small, *extra)
    assert result["protocol"]["test_official"] == 2620 and result["protocol"]["test_scored"] == 2
    clean = librispeech(tmp_path, ("train.100", "validation", "test"), "librispeech_asr-clean")
    prepared = _prepare(task, clean, *extra)
    assert prepared.info["hf"]["splits"] == {"train": ["train.100"], "dev": ["validation"], "test": ["test"]}
    u = prepared.splits["train"][1]
    assert (u.id, u.speaker, u.duration_s, u.labels["text"]) == ("100-200-0001", "100", 1.2, "HELLO DOG")
    if task == "pr":
        assert u.labels["phones"] == "HH AH0 L OW1 D AO1 G"


def test_asv_runs_on_a_voxceleb_layout_with_its_trial_list(tmp_path):
    root = voxceleb(tmp_path)
    result = _run(tmp_path, "asv", root, *SMALL_ASV[3:])
    protocol = result["protocol"]
    assert protocol["trial_list"] == "veri_test.txt" and protocol["trials"] == 4
    assert result["data"]["trial_list"] == str(tmp_path / "voxceleb" / "veri_test.txt")  # relative to the dataset
    prepared = _prepare("asv", root, *SMALL_ASV[3:])
    assert [u.id for u in prepared.splits["test"]] == ["id10270/vid0/00000", "id10270/vid1/00000",
                                                       "id10271/vid0/00000", "id10271/vid1/00000"]
    assert len({u.speaker for u in prepared.splits["dev"]}) == 2 and len(prepared.label_space.trials["dev"]) > 0
    assert not {u.speaker for u in prepared.splits["train"]} & {u.speaker for u in prepared.splits["dev"]}


# ---------------------------------------------------------------------------------------------- the export

def _rows(run_dir: Path) -> dict[str, list[dict]]:
    """A run's manifests without the audio location (which is what differs between the two layouts)."""
    return {p.stem: [{k: v for k, v in json.loads(line).items() if k not in ("path", "audio_root")}
                     for line in p.read_text().splitlines()] for p in sorted((run_dir / "manifests").glob("*.jsonl"))}


def test_export_loads_back_and_prepares_every_task_as_the_native_layout(tmp_path, synth_tiny):
    import datasets

    folders = export_hf(synth_tiny, tmp_path / "hf")
    assert sorted(folders) == ["asr", "asv", "er", "ic", "ks", "pr", "sid"]
    ks = datasets.load_from_disk(str(folders["ks"])).cast_column("audio", Audio(decode=False))
    assert list(ks) == ["train", "validation", "test"] and ks["train"].info.dataset_name == "speechbench-synth"
    first = read_manifest(synth_tiny / "ks" / "train.jsonl")[0]
    assert ks["train"][0]["audio"]["bytes"] == (synth_tiny / first.path).read_bytes()
    assert ks["train"].features["label"].names == SUPERB_KS and list(datasets.load_from_disk(str(folders["er"]))) \
        == [f"session{k}" for k in range(1, 6)]
    for task in folders:
        t = get_task(task)
        native = resolve_config(RunRequest(upstream="fbank", task=task, overrides=("data.profile=tiny",)), t)
        hf = resolve_config(RunRequest(upstream="fbank", task=task, recipe=f"synth/{task}",
                                       data_root=f"hf:{folders[task]}"), t)
        a, b = t.prepare(native.data, native.task_options), t.prepare(hf.data, hf.task_options)
        rows = [{s: [{**u.to_row(), "path": None} for u in utts] for s, utts in p.splits.items()} for p in (a, b)]
        assert rows[0] == rows[1] and a.label_space == b.label_space and b.corpus == "synth", task
    assert export_hf(synth_tiny, tmp_path / "hf") == folders  # complete folders are kept


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_tiny):
    """``bench data synth --profile tiny --format hf`` into a copy of the session's tiny corpus (which the command
    reuses as it is complete: only the export is written)."""
    out = tmp_path_factory.mktemp("export") / "corpus"
    shutil.copytree(synth_tiny, out)
    assert main(["data", "synth", "--out", str(out), "--profile", "tiny", "--format", "hf"]) == 0
    return out


@pytest.mark.parametrize("task, overrides", [
    ("ks", ("train.max_steps=20", "train.eval_every=10", "optim.lr=1e-2")),
    ("pr", ("train.max_steps=10", "train.eval_every=5", "task_options.project_dim=32")),
])
def test_export_gives_the_native_manifests_and_numbers(tmp_path, exported, task, overrides):
    """One pooled task and one frame task: through ``bench data synth --format hf`` and ``--data-root hf:...``, the
    same manifests and the same result, to the last digit."""
    out = exported
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["asr", "asv", "er", "ic", "ks", "pr", "sid"]
    args = ["run", "--upstream", "fbank_no_cmvn", "--task", task, "--recipe", f"synth/{task}", "data.profile=tiny",
            *overrides]
    assert main([*args, "--out", str(tmp_path / "native")]) == 0
    assert main([*args, "--data-root", f"hf:{out / 'hf' / task}", "--out", str(tmp_path / "hf")]) == 0
    runs = [next((tmp_path / layout / "fbank_no_cmvn" / task).iterdir()) for layout in ("native", "hf")]
    results = [json.loads((r / "result.json").read_text()) for r in runs]
    assert _rows(runs[0]) == _rows(runs[1])
    for key in ("value", "extra_metrics", "layer_weights", "best_step", "items"):
        assert results[0][key] == results[1][key], key
    assert results[1]["data"]["corpus"] == "synth" and results[1]["data"]["hf"]["name"] == "speechbench-synth"
    predictions = "predictions.tsv" if task == "ks" else "hyp.txt"
    assert (runs[0] / predictions).read_text() == (runs[1] / predictions).read_text()


# ---------------------------------------------------------------------------------------------- folders and hub ids

def test_parquet_folders_one_subfolder_per_split_and_split_named_files(tmp_path):
    root = Path(superb_er(tmp_path)[3:])
    import datasets

    loaded = datasets.load_from_disk(str(root))
    for k in range(1, 6):  # the hub's Parquet export: <config>/<split>/0000.parquet
        (tmp_path / "er-parquet" / f"session{k}").mkdir(parents=True)
        loaded[f"session{k}"].to_parquet(str(tmp_path / "er-parquet" / f"session{k}" / "0000.parquet"))
    prepared = _prepare("er", f"hf:{tmp_path / 'er-parquet'}")
    assert prepared.info["hf"]["splits"]["fold1"] == ["session1"] and len(prepared.splits["test"]) == 4
    assert load_utterance_audio(prepared.splits["test"][0], prepared.audio_root).shape == (16000,)
    flat = tmp_path / "ks-parquet" / "data"  # push_to_hub's layout: data/<split>-00000-of-00001.parquet
    flat.mkdir(parents=True)
    ks = datasets.load_from_disk(superb_ks(tmp_path)[3:])
    for split in ks:
        ks[split].to_parquet(str(flat / f"{split}-00000-of-00001.parquet"))
    assert len(_prepare("ks", f"hf:{flat.parent}").splits["test"]) == 7


def test_data_roots_resolve_folders_and_keep_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sets" / "vox").mkdir(parents=True)
    asv = get_task("asv")
    cfg = resolve_config(RunRequest(upstream="fbank", task="asv", data_root="hf:sets/vox"), asv)
    assert cfg.data.root == f"hf:{tmp_path / 'sets' / 'vox'}"
    assert cfg.task_options.trial_list == str(tmp_path / "sets" / "vox" / "veri_test.txt")
    hub = resolve_config(RunRequest(upstream="fbank", task="asv", data_root="hf:google/speech_commands:v0.01"), asv)
    assert hub.data.root == "hf:google/speech_commands:v0.01"
    assert hub.task_options.trial_list == str(tmp_path / "veri_test.txt")  # a hub id: the working directory
    sweep = load_sweep(None, upstreams=("fbank",), tasks=("asv",), data_root="hf:sets/vox")  # jobs start anywhere
    assert sweep.data_root == f"hf:{tmp_path / 'sets' / 'vox'}"
    assert load_sweep(None, upstreams=("fbank",), tasks=("ks",), data_root="hf:superb:ks").data_root == "hf:superb:ks"
    cfg = resolve_config(RunRequest(upstream="fbank", task="ks", data_root="hf:x", overrides=(
        "task_options.columns.keyword=word", "task_options.splits.dev=valid,extra")), get_task("ks"))
    assert cfg.task_options.columns == {"keyword": "word"} and cfg.task_options.splits == {"dev": "valid,extra"}
    with pytest.raises(ConfigError, match=r"task_options.columns: expected a mapping"):
        resolve_config(RunRequest(upstream="fbank", task="ks", overrides=("task_options.columns=word",)),
                       get_task("ks"))


def test_hub_ids_load_offline_from_the_cache_or_say_why_not(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--data-root", "hf:nobody/no_such_set:v1",
                 "--out", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("bench: error: hf:nobody/no_such_set:v1: cannot load the hub dataset 'nobody/no_such_set' "
                           "config 'v1' (")
    # a clone of a script dataset (datasets 4+ runs no loading scripts): the Parquet export is the way
    (tmp_path / "superb").mkdir()
    (tmp_path / "superb" / "superb.py").write_text("import datasets\n")
    with pytest.raises(DataError, match=r"superb.py is a dataset loading script; datasets 4 and later no longer run"):
        _prepare("ks", f"hf:{tmp_path / 'superb'}")


# ---------------------------------------------------------------------------------------------- bad rows

PLAIN_AUDIO = {"bytes": Value("binary"), "path": Value("string")}  # Audio's storage, without Audio's embedding


def _one_row_ks(tmp_path: Path, audio=None, label="yes", feature=None, name="bad") -> str:
    """superb ks with one bad test row (row 1 of the test split, id 'bad')."""
    good = {"bytes": wav_bytes(1.0, 0), "path": "x.wav"}
    def split(rows):
        return build_dataset({"id": Column([r[0] for r in rows]),
                              "audio": Column([r[1] for r in rows], feature or Audio(sampling_rate=16000)),
                              "label": Column([r[2] for r in rows], ClassLabel(names=SUPERB_KS))})
    return save(tmp_path, name, {"train": split([("t0", good, "yes"), ("t1", good, "no")]),
                                 "validation": split([("d0", good, "yes")]),
                                 "test": split([("s0", good, "yes"), ("bad", audio if audio is not None else good,
                                                                      label)])})


@pytest.mark.parametrize("case, message", [
    ("empty", "split 'test' row 1 (id bad): column 'audio' holds empty audio (0 samples)"),
    ("no audio", "split 'test' row 1 (id bad): column 'audio' holds no audio (no bytes and no path)"),
    ("corrupt", "split 'test' row 1 (id bad): column 'audio' is not readable audio (LibsndfileError: "),
    ("stereo", "split 'test' row 1 (id bad): column 'audio' holds 2-channel audio; expected mono"),
    ("missing label", "split 'test' row 1 (id bad): no keyword (column 'label' is empty)"),
    ("label -1", "split 'test' row 1 (id bad): no keyword (column 'label' is empty)"),  # datasets' missing ClassLabel
    ("sampling rate", "split 'test' row 1 (id bad): column 'audio' has sampling rate 0; expected a positive integer"),
    ("missing path", "split 'test' row 1 (id bad): column 'audio' has no bytes and its path 'gone.wav' is not a file"),
])
def test_bad_rows_are_one_line_errors_naming_the_row(tmp_path, case, message):
    audio, label, feature = {"bytes": wav_bytes(1.0, 1), "path": "x.wav"}, "yes", None
    if case == "empty":
        audio = {"bytes": wav_bytes(0.0, 1), "path": "x.wav"}
    elif case == "no audio":
        audio, feature = {"bytes": None, "path": None}, PLAIN_AUDIO
    elif case == "corrupt":
        audio = {"bytes": b"RIFF....not a wav file at all", "path": "x.wav"}
    elif case == "stereo":
        audio = {"bytes": wav_bytes(1.0, 1, channels=2), "path": "x.wav"}
    elif case == "missing label":
        label = None
    elif case == "label -1":
        label = -1
    elif case == "missing path":
        audio, feature = {"bytes": None, "path": "gone.wav"}, PLAIN_AUDIO
    if case == "sampling rate":  # a decoded {array, sampling_rate} column whose rate is not a rate
        import pyarrow as pa

        arrays = pa.struct({"array": pa.list_(pa.float32()), "sampling_rate": pa.int64()})
        good = {"array": [0.1] * 1600, "sampling_rate": 16000}
        root = _decoded_ks(tmp_path, good, {"array": [0.1] * 1600, "sampling_rate": 0}, arrays)
    else:
        root = _one_row_ks(tmp_path, audio, label, feature)
    with pytest.raises(DataError) as e:
        _prepare("ks", root)
    assert str(e.value).startswith(f"{root}: {message}") and "\n" not in str(e.value), str(e.value)


def test_a_bad_row_stops_bench_run_with_one_line(tmp_path, capsys):
    root = _one_row_ks(tmp_path, label=None)
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--data-root", root, "--out",
                 str(tmp_path / "out")]) == 2
    assert error_line(capsys.readouterr().err) == \
        f"bench: error: {root}: split 'test' row 1 (id bad): no keyword (column 'label' is empty)"


def _decoded_ks(tmp_path: Path, good: dict, bad: dict, arrow_type) -> str:
    import datasets
    import pyarrow as pa

    def split(rows):
        table = pa.table({"id": pa.array([r[0] for r in rows]), "audio": pa.array([r[1] for r in rows], arrow_type),
                          "label": pa.array([SUPERB_KS.index(r[2]) for r in rows], pa.int64())})
        features = datasets.Features({"id": Value("string"), "audio": {"array": datasets.List(Value("float32")),
                                                                       "sampling_rate": Value("int64")},
                                      "label": ClassLabel(names=SUPERB_KS)})
        return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
    return save(tmp_path, "decoded", {"train": split([("t0", good, "yes"), ("t1", good, "no")]),
                                      "validation": split([("d0", good, "yes")]),
                                      "test": split([("s0", good, "yes"), ("bad", bad, "yes")])})


def test_audio_stored_as_paths_reads_the_files(tmp_path):
    """Rows that hold a path and no bytes (datasets prepared by older loading scripts) point at the files; a relative
    path is taken from the dataset's folder."""
    ks = Path(_one_row_ks(tmp_path, {"bytes": None, "path": "clips/kept.wav"}, feature=PLAIN_AUDIO)[3:])
    (ks / "clips").mkdir()
    (ks / "clips" / "kept.wav").write_bytes(wav_bytes(0.5, 3, rate=8000))
    prepared = _prepare("ks", f"hf:{ks}")
    u = prepared.splits["test"][1]
    assert (u.path, u.duration_s) == (str(ks / "clips" / "kept.wav"), 0.5)
    assert load_utterance_audio(u, prepared.audio_root).shape == (8000,)  # resampled to 16 kHz


def test_decoded_arrays_at_another_rate_are_resampled(tmp_path):
    import pyarrow as pa

    arrow_type = pa.struct({"array": pa.list_(pa.float32()), "sampling_rate": pa.int64()})
    tone = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 200).astype(np.float32)
    row = {"array": tone.tolist(), "sampling_rate": 8000}
    prepared = _prepare("ks", _decoded_ks(tmp_path, row, row, arrow_type))
    u = prepared.splits["test"][1]
    assert u.duration_s == 1.0 and u.path == "test/data-00000-of-00001.arrow#audio:1"
    assert load_utterance_audio(u, prepared.audio_root).shape == (16000,)


def test_nan_audio_is_refused_when_read_naming_the_utterance(tmp_path, capsys):
    buf = io.BytesIO()
    sf.write(buf, np.full(16000, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    root = _one_row_ks(tmp_path, {"bytes": buf.getvalue(), "path": "nan.wav"})
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--data-root", root, "--out",
                 str(tmp_path / "out"), *SMALL]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.endswith("test/data-00000-of-00001.arrow#audio:1 (utterance bad): audio contains NaN or infinite "
                         "samples"), line


def test_missing_columns_and_splits_list_what_the_dataset_has(tmp_path):
    root = _one_row_ks(tmp_path)
    with pytest.raises(DataError, match=r"no column for the keyword field \(looked for label\); the dataset has "
                                        r"columns id, audio, word; set task_options.columns.keyword=<column>"):
        _prepare("ks", _renamed(tmp_path, root, {"label": "word"}))
    with pytest.raises(DataError, match=r"no dev split \(looked for validation, dev, valid\); the dataset has "
                                        r"train \(2 rows\), heldout \(1 rows\), test \(2 rows\); set "
                                        r"task_options.splits.dev=<name>"):
        _prepare("ks", _renamed(tmp_path, root, {}, {"validation": "heldout"}, "renamed-split"))
    with pytest.raises(DataError, match=r"task_options.columns: unknown field\(s\) \['label'\]; this task reads "
                                        r"audio, id, file, keyword, speaker"):
        _prepare("ks", root, "task_options.columns.label=x")
    # mapped explicitly, the same dataset prepares
    renamed = _renamed(tmp_path, root, {"label": "word"}, {"validation": "heldout"}, "mapped")
    prepared = _prepare("ks", renamed, "task_options.columns.keyword=word", "task_options.splits.dev=heldout")
    assert [u.id for u in prepared.splits["dev"]] == ["d0"]
    assert prepared.info["hf"]["columns"]["keyword"] == "word"


def _renamed(tmp_path: Path, root: str, columns: dict, splits: dict | None = None, name: str = "renamed") -> str:
    import datasets

    loaded = datasets.load_from_disk(root[3:])
    return save(tmp_path, name, {(splits or {}).get(s, s): loaded[s].rename_columns(columns) for s in loaded})


def test_the_reader_remaps_its_files_and_reads_the_same_audio(tmp_path, monkeypatch):
    prepared = _prepare("asr", librispeech(tmp_path))
    utts = [u for split in prepared.splits.values() for u in split]
    expected = [load_utterance_audio(u, prepared.audio_root) for u in utts]
    monkeypatch.setattr(hf_data, "_FILES", hf_data._MappedFiles(budget=1))  # drop the mappings after every read
    again = [load_utterance_audio(u, prepared.audio_root) for u in reversed(utts)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, reversed(again), strict=True))
    assert not hf_data._FILES._tables
