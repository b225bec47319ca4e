import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from shared.corpus import CharTokenizer, CorpusError, download_corpus, load_corpus
from tests.helpers import SHAKESPEARE_SHA256, text_of


class _Server:
    """A real HTTP server on loopback serving one body at /corpus.txt."""

    def __init__(self, body: bytes) -> None:
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/corpus.txt"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_corpus():
    servers = []

    def serve(body: bytes) -> _Server:
        servers.append(_Server(body))
        return servers[-1]

    yield serve
    for server in servers:
        server.close()


def test_tokenizer_sorted_with_mask_last():
    tok = CharTokenizer.from_text("hello world")
    assert tok.itos == [" ", "d", "e", "h", "l", "o", "r", "w", "[MASK]"]
    assert tok.mask_id == 8 and tok.vocab_size == 9 and tok.dtype == np.uint8
    assert tok.ignore_value == 255
    ids = tok.encode("hello world")
    assert ids.dtype == np.uint8 and text_of(tok, ids) == "hello world"


def test_tokenizer_beyond_latin1_and_wide_vocab():
    text = "".join(chr(0x4E00 + i) for i in range(300)) + "é"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 302 and tok.dtype == np.uint16 and tok.ignore_value == 65535
    assert text_of(tok, tok.encode(text)) == text


def test_shakespeare_split_and_vocab(shakespeare, tmp_path):
    corpus = load_corpus(
        corpus_path=shakespeare,
        corpus="tinyshakespeare",
        corpus_url="unused",
        corpus_sha256=SHAKESPEARE_SHA256,
        cache_dir=tmp_path,
        train_val_split=0.9,
    )
    text = shakespeare.read_text()
    assert corpus.sha256 == SHAKESPEARE_SHA256
    assert corpus.tokenizer.vocab_size == 66  # 65 characters + [MASK]
    assert len(corpus.train) == int(len(text) * 0.9)
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert (
        text_of(corpus.tokenizer, corpus.val[:100])
        == text[len(corpus.train) : len(corpus.train) + 100]
    )


def test_download_verifies_and_caches(http_corpus, tmp_path):
    body = b"To be, or not to be, that is the question.\n" * 50
    server = http_corpus(body)
    sha = hashlib.sha256(body).hexdigest()
    path = download_corpus(server.url, sha, tmp_path / "cache", "hamlet")
    assert path.read_bytes() == body
    again = download_corpus(server.url, sha, tmp_path / "cache", "hamlet")
    assert again == path and server.hits == 1  # the second call used the cache


def test_download_with_wrong_hash_is_refused_and_not_cached(http_corpus, tmp_path):
    server = http_corpus(b"tampered text\n")
    with pytest.raises(CorpusError) as err:
        download_corpus(server.url, SHAKESPEARE_SHA256, tmp_path / "cache", "tinyshakespeare")
    assert "expected " + SHAKESPEARE_SHA256 in str(err.value)
    assert "--corpus_path=" in str(err.value)
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()


def test_failed_download_says_how_to_use_a_local_file(tmp_path):
    with pytest.raises(CorpusError, match=r"could not download.*CORPUS_PATH="):
        download_corpus(
            "http://127.0.0.1:9/nothing.txt", SHAKESPEARE_SHA256, tmp_path, "x", timeout=2
        )


def test_local_file_errors(tmp_path):
    kwargs = dict(
        corpus="x", corpus_url="u", corpus_sha256="0" * 64, cache_dir=tmp_path, train_val_split=0.9
    )
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(corpus_path=tmp_path / "missing.txt", **kwargs)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf8 \xc3")
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(corpus_path=bad, **kwargs)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(corpus_path=empty, **kwargs)


def test_any_text_file_by_path(small_corpus: Path, tmp_path):
    corpus = load_corpus(
        corpus_path=small_corpus,
        corpus="tinyshakespeare",
        corpus_url="unused",
        corpus_sha256=SHAKESPEARE_SHA256,
        cache_dir=tmp_path,
        train_val_split=0.5,
    )
    assert corpus.name == "small"
    assert text_of(corpus.tokenizer, corpus.train[:6]) == "Line 0"
