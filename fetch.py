"""Download the reproduction's public inputs, pinned and checked.

    python fetch.py all --out inputs/        # or some of: alpaca tuna-release superni lmentry vicuna

Each input is a set of files of one GitHub repository at one commit, fetched over HTTPS and checked
against its git blob id (the sha1 of b"blob <size>\\0" + the bytes) before it takes its name: the ids
of single files are written below; those of a folder's many files come from the commit's tree, read
once from GitHub's API and kept in OUT/.trees/. A file already there whose id matches is kept, so a
second run fetches nothing; a download that is cut off or killed resumes from its partial file
(.NAME.part, beside it) with an HTTP Range request. The folder is laid out as the scripts read it:

    OUT/alpaca/alpaca_data.json                 tuna.py sft --data, teacher.py --data
    OUT/tuna-release/train.*.json               tuna.py rank --data (the authors' ranking release)
    OUT/superni/splits/default/test_tasks.txt   eval.py --superni OUT/superni
    OUT/superni/tasks/<task>.json               (the 119 English test tasks)
    OUT/lmentry/<task>.json                     eval.py --lmentry OUT/lmentry
    OUT/vicuna/question.jsonl                   eval.py --vicuna OUT/vicuna
    OUT/vicuna/reference_answer/gpt-4.jsonl

This is the project's only download: training, ranking and evaluation read these files and never
the network. --raw-url and --api-url replace GitHub's hosts (a mirror, or the tests' local server).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import requests

import data

# ---- 1. The inputs, each pinned to a commit

@dataclass(frozen=True)
class Input:
    """Files of one GitHub repository (owner/name) at one commit, and their licence (printed
    once a run). files: repository path -> git blob id, pinned here; folder: a folder fetched
    whole, and task_list: a file whose lines name tasks/<line>.json to fetch as well (Super-NI's
    split), both with blob ids from the commit's tree; strip: the prefix of the repository's
    paths that the layout drops."""
    repo: str
    commit: str
    licence: str
    files: dict = field(default_factory=dict)
    folder: str = ""
    task_list: str = ""
    strip: str = ""


INPUTS = {
    "alpaca": Input(
        "tatsu-lab/stanford_alpaca", "761dc5bfbdeeffa89b8bff5d038781a4055f796a",
        "CC BY-NC 4.0 (DATA_LICENSE), NON-COMMERCIAL; its README: for research use only",
        files={"alpaca_data.json": "3779ddbc040543ab1834ef216c983d6fcc06cc9a"}),
    "tuna-release": Input(
        "microsoft/LMOps", "4f2a9deb5f08e459fd44c2e4792344d78ca89fc3",
        "NON-COMMERCIAL: LMOps is MIT, but tuna/README.md marks the data CC BY-NC 4.0 (Alpaca's "
        "instructions with text-davinci-003's answers and GPT-4's rankings)",
        files={"tuna/gpt_data/train.davinci_003_w_prob.w_orig_alpaca.json":
               "9735feaa0ac2fa1e0345b8c392b418dd4178de07",
               "tuna/gpt_data/train.gpt-4-ranking.w_orig_alpaca.json":
               "661dda9766c4153fdb79bec4f2a99cc878bdc961",
               "tuna/gpt_data/gpt-4-ranking.json": "f871512d38a580c8973be946d163169b8ad3aa30"},
        strip="tuna/gpt_data/"),
    "superni": Input(
        "allenai/natural-instructions", "e0fd31052b21acea5bd95fb00253e1ee1f5d8259",
        "Apache-2.0 (its README: all but the instances); each task's instances under their source "
        "dataset's licence, named in the task file's 'Instance License'",
        files={"splits/default/test_tasks.txt": "85b968fc450d8c7e263c061764a939d579743ade"},
        task_list="splits/default/test_tasks.txt"),
    "lmentry": Input(
        "aviaefrat/lmentry", "646ae9080dad00a194fa32cb0f330d7acf3ce60c",
        "none stated (no LICENSE file; the README is silent); its files carry a canary string "
        "asking that they stay out of training data",
        folder="data/", strip="data/"),
    "vicuna": Input(
        "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "Apache-2.0 (FastChat's LICENSE)",
        files={"fastchat/llm_judge/data/vicuna_bench/question.jsonl":
               "223642384936578e66cf127936251dda6a51d595",
               "fastchat/llm_judge/data/vicuna_bench/reference_answer/gpt-4.jsonl":
               "f3c8368d058cd01912c41b9ca9e67ce82867bdf3"},
        strip="fastchat/llm_judge/data/vicuna_bench/"),
}

RAW_URL = "https://raw.githubusercontent.com"  # RAW_URL/OWNER/REPO/COMMIT/PATH
API_URL = "https://api.github.com"             # API_URL/repos/OWNER/REPO/git/trees/COMMIT?recursive=1

# a connection that drops after bytes arrived is resumed at once, this many times
RESUMES = 3
# a line of progress this often while a big file downloads
PROGRESS_SECONDS = 5
TIMEOUT = (15, 60)  # seconds to connect, seconds between bytes


class FetchError(RuntimeError):
    """A download that cannot be used; the message names the URL or the file."""


# ---- 2. Git blob ids and the commit's tree

def blob_id(path):
    """The git blob id of a file: the sha1 of b"blob <size>\\0" followed by its bytes."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def commit_tree(source, out, api_url, session):
    """{repository path: (blob id, size)} of every file at source's commit, from GitHub's
    git-trees API; the listing is kept in OUT/.trees/, so it is asked for once."""
    kept = os.path.join(out, ".trees", f"{source.repo.replace('/', '+')}@{source.commit}.json")
    url = f"{api_url}/repos/{source.repo}/git/trees/{source.commit}?recursive=1"
    if not os.path.exists(kept):
        reply = request(session, url)
        with reply:
            text = reply.text
        if json_tree(text, url).get("truncated"):
            raise FetchError(f"{url}: the listing is truncated (too many files for one request)")
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        data.write_atomic(kept, text)
    with open(kept, encoding="utf-8") as f:
        listing = json_tree(f.read(), kept)
    return {entry["path"]: (entry["sha"], entry["size"])
            for entry in listing["tree"] if entry["type"] == "blob"}


def json_tree(text, where):
    """A git-trees listing parsed and its shape checked: {"tree": [{"path", "type", "sha",
    "size" (blobs)}, ...], "truncated"}."""
    try:
        listing = json.loads(text)
        for entry in listing["tree"]:
            if entry["type"] == "blob" and not (entry["path"] and entry["sha"] and entry["size"] >= 0):
                raise ValueError(f"entry {entry}")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise FetchError(f"{where}: not a git-trees listing ({type(e).__name__}: {e})") from None
    return listing


def listed_files(source, name, out, api_url, session):
    """[(repository path, blob id, size)] of the files an input's folder or task list names,
    their ids from the commit's tree ([] for an input of pinned files only). The task list is
    one of the pinned files: on disk and checked by the time this reads it."""
    if not (source.folder or source.task_list):
        return []
    tree = commit_tree(source, out, api_url, session)
    where = f"{source.repo}@{source.commit}"
    if source.folder:
        wanted = [path for path in sorted(tree) if path.startswith(source.folder)]
    else:
        with open(destination(out, name, source, source.task_list), encoding="utf-8") as f:
            wanted = [f"tasks/{line.strip()}.json" for line in f if line.strip()]
    if not wanted:
        raise FetchError(f"{source.folder or source.task_list}: names no files in {where}'s tree")
    missing = [path for path in wanted if path not in tree]
    if missing:
        raise FetchError(f"{missing[0]}: not in {where}'s tree ({len(missing)} of {len(wanted)} "
                         f"files missing)")
    return [(path, *tree[path]) for path in wanted]


def destination(out, name, source, path):
    """Where a repository path lands: OUT/NAME/ + the path without the input's prefix."""
    parts = path.removeprefix(source.strip).split("/")
    if path.startswith("/") or ".." in parts:
        raise FetchError(f"{path}: a path that leaves {os.path.join(out, name)}")
    return os.path.join(out, name, *parts)


# ---- 3. One file: resumable, checked, renamed into place

def fetch_file(session, url, dest, expected, size, label):
    """Download url to dest, checked against its git blob id: the bytes go to .NAME.part beside
    dest (a part a killed run left is resumed with a Range request, as is a connection that
    drops) and take dest's name only if their id is `expected`; a mismatch leaves nothing.
    size: the expected size where known (for progress); label: the file's name in progress."""
    part = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.part")
    # its bytes would go to the link's target, which a mismatch would then lose
    if os.path.islink(part):
        raise FetchError(f"{part}: a symlink, not a partial download of fetch.py; remove it, then run again")
    for resume in range(RESUMES + 1):
        try:
            receive(session, url, part, size, label)
            break
        except ConnectionLost as lost:
            if resume == RESUMES:
                raise FetchError(f"{url}: {lost}; gave up after {RESUMES} resumes "
                                 f"(run again to resume from {part})") from None
            print(f"  {label}: {lost}; resuming", flush=True)
    got = blob_id(part)
    if got != expected:
        os.remove(part)
        raise FetchError(f"{dest}: git blob id {got}, expected {expected} (from {url}); "
                         "the download was deleted")
    os.replace(part, dest)


class ConnectionLost(Exception):
    """The connection dropped after some bytes arrived: worth resuming."""


def receive(session, url, part, size, label):
    """Append url's bytes to part, from where part ends (a Range request); a server that
    sends the whole file instead (200) overwrites part. The folder and part are made only
    once the server answers."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    reply = request(session, url, headers={"Range": f"bytes={have}-"} if have else {},
                    accept=(200, 206, 416))
    with reply:
        if reply.status_code == 416:  # nothing past `have`: part is whole already
            return
        resumed = reply.status_code == 206
        if resumed and not reply.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise FetchError(f"{url}: asked for bytes {have}-, answered "
                             f"Content-Range {reply.headers.get('Content-Range')!r}")
        start = have if resumed else 0
        length = reply.headers.get("Content-Length")
        total = start + int(length) if length else size
        os.makedirs(os.path.dirname(part), exist_ok=True)
        done = start
        shown = time.monotonic()
        with open(part, "ab" if resumed else "wb") as f:
            try:
                for chunk in reply.iter_content(1 << 16):
                    f.write(chunk)
                    done += len(chunk)
                    if time.monotonic() - shown > PROGRESS_SECONDS:
                        shown = time.monotonic()
                        print(f"  {label}: {amount(done)} of {amount(total)}", flush=True)
            except requests.RequestException as e:
                raise ConnectionLost(f"connection lost after {amount(done)} of {amount(total)} "
                                     f"({root_cause(e)})") from None


def request(session, url, headers=None, accept=(200,)):
    """A streamed GET whose status is in `accept`; anything else is a FetchError naming url."""
    try:
        reply = session.get(url, headers=headers or {}, stream=True, timeout=TIMEOUT)
    except requests.RequestException as e:
        raise FetchError(f"cannot reach {url}: {root_cause(e)}") from None
    if reply.status_code not in accept:
        reply.close()
        raise FetchError(f"{url}: HTTP {reply.status_code} {reply.reason}")
    return reply


def root_cause(error):
    """The innermost cause of a requests error, in one line: "[Errno 111] Connection refused"."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return " ".join(f"{type(error).__name__}: {error}".split())


def amount(size):
    """A byte count for people: 950.8 kB, 21.7 MB; '?' when unknown."""
    if size is None:
        return "?"
    return f"{size / 1e3:.1f} kB" if size < 1e6 else f"{size / 1e6:.1f} MB"


# ---- 4. An input: its licence, then each file fetched or kept

def fetch_input(name, out, raw_url, api_url, session):
    """Fetch one input into OUT/NAME: its pinned files, then those its folder or task list
    names."""
    source = INPUTS[name]
    print(f"{name}: {source.repo} at {source.commit[:12]}; licence: {source.licence}", flush=True)
    pinned = [(path, blob, None) for path, blob in source.files.items()]
    placed = [place(source, name, out, raw_url, session, *file) for file in pinned]
    placed += [place(source, name, out, raw_url, session, *file)
               for file in listed_files(source, name, out, api_url, session)]
    fetched = sum(was_fetched for was_fetched, _ in placed)
    total = sum(size for _, size in placed)
    print(f"{name}: {len(placed)} files, {amount(total)} in {os.path.join(out, name)} "
          f"({fetched} fetched, {len(placed) - fetched} kept: their blob ids match)", flush=True)


def place(source, name, out, raw_url, session, path, blob, size):
    """One file of an input in its place -> (fetched, its size). A file already there with the
    pinned blob id is kept; one with another id, or a symlink to nothing, is refused, never
    overwritten."""
    dest = destination(out, name, source, path)
    # the rename would replace the link, a file fetch.py did not write
    if os.path.islink(dest) and not os.path.exists(dest):
        raise FetchError(f"{dest}: a symlink to nothing ({os.readlink(dest)}); remove it to fetch the pinned "
                         "file")
    if os.path.exists(dest):
        got = blob_id(dest)
        if got != blob:
            raise FetchError(f"{dest}: exists with git blob id {got}, not the pinned {blob}; "
                             "move it away to fetch the pinned file")
        return False, os.path.getsize(dest)
    label = os.path.relpath(dest, out)
    fetch_file(session, f"{raw_url}/{source.repo}/{source.commit}/{path}", dest, blob, size, label)
    print(f"  {label} {amount(os.path.getsize(dest))}", flush=True)
    return True, os.path.getsize(dest)


# ---- 5. Command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="fetch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", choices=[*INPUTS, "all"], metavar="INPUT",
                        help=f"{', '.join(INPUTS)}, or all")
    parser.add_argument("--out", required=True, help="the folder the inputs land in, one folder each")
    parser.add_argument("--raw-url", default=RAW_URL,
                        help=f"where files are read, as RAW_URL/OWNER/REPO/COMMIT/PATH (default {RAW_URL})")
    parser.add_argument("--api-url", default=API_URL,
                        help=f"where a commit's tree is read (default {API_URL})")
    args = parser.parse_args(argv)
    names = list(INPUTS) if "all" in args.inputs else list(dict.fromkeys(args.inputs))
    session = requests.Session()
    session.headers["User-Agent"] = "tuna-fetch"
    # the file's own bytes, never a compressed stream: Range offsets and blob ids count those
    session.headers["Accept-Encoding"] = "identity"
    try:
        with data.lock_output(args.out):
            for name in names:
                fetch_input(name, args.out, args.raw_url.rstrip("/"), args.api_url.rstrip("/"), session)
    except (FetchError, data.OutputLocked, OSError) as e:
        print(f"fetch.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
