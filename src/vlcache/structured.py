"""Structured outputs: answers held to a JSON schema (or to any JSON object) by xgrammar's token masks.

A row with a grammar gets a JsonConstraint, decode.sampling's per-row TokenConstraint: before each step it fills
the row's packed bitmask of allowed tokens (on the host), the sampler masks the row's logits with it on the
device, and the drawn token is fed back. Rows with and without a grammar share a batch.

xgrammar was chosen by measurement (docs/benchmarks-grammar.md: its mask costs a few microseconds a row where
llguidance's costs tens, both far below a 2B step) and because it ships a transformers logits processor, which the
exactness test runs generate() with. JSON is compact: no whitespace beyond the fixed separators ", " and ": ", so a
model cannot loop on spaces. Compiling a schema against a 151,936-token vocabulary costs most of a second: compiled
grammars are kept per engine (COMPILED_KEPT of them, least recently used dropped).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

from .errors import VlcacheError

COMPILED_KEPT = 64
MAX_SCHEMA_BYTES = 64 * 1024  # a schema's JSON text: compiling is linear in it, and a client sends it


class SchemaError(VlcacheError):
    """A JSON schema the grammar library cannot compile (or one too large)."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise VlcacheError("structured outputs need xgrammar: pip install 'vlcache[structured]'") from None
    return xgrammar


def schema_text(schema) -> str:
    """The schema as canonical JSON text (the compile cache's key); refuses what is not a JSON object or too big."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SchemaError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise SchemaError("a JSON schema must be a JSON object")
    text = json.dumps(schema, separators=(",", ":"))  # key order kept: it is the order properties are written in
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the JSON schema is {len(text):,} bytes; at most {MAX_SCHEMA_BYTES:,} are taken")
    return text


_DATA_KEYS = ("enum", "const", "default", "examples")  # JSON values, not schemas: left as they are


def _plain_strings(schema):
    """The schema with every length-limited string ({"type": "string", "maxLength": n}) as a pattern of the same
    length over the characters JSON lets stand unescaped. xgrammar 0.2.8 builds length-limited strings from a
    character class that lets raw control characters through (invalid JSON: tested) and no escapes; its regex
    path for patterns excludes what the pattern excludes. Escapes are then not written in such strings."""
    if isinstance(schema, list):
        return [_plain_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in _DATA_KEYS else _plain_strings(value) for key, value in schema.items()}
    limited = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and limited and not any(k in out for k in ("pattern", "format", *_DATA_KEYS)):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        if isinstance(low, int) and (high == "" or isinstance(high, int)):
            out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{high}}}$'
    return out


class JsonConstraint:
    """One row's grammar state (decode.sampling.TokenConstraint): fill_mask, accept, is_terminated."""

    def __init__(self, compiled):
        self.matcher = _xgrammar().GrammarMatcher(compiled)

    def fill_mask(self, bitmask_row) -> None:
        """Write the allowed next tokens into `bitmask_row` (int32 [ceil(V/32)], CPU). A finished row may still sit
        in its batch until the others end (its tokens dropped): its mask is left as it came (all allowed)."""
        if not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(bitmask_row)

    def accept(self, token: int) -> bool:
        if self.matcher.is_terminated():
            return False  # nothing follows the stop token
        return self.matcher.accept_token(int(token))

    def is_terminated(self) -> bool:
        """The JSON is complete and a stop token was taken."""
        return self.matcher.is_terminated()


class JsonGrammars:
    """A model's compiled JSON grammars: its tokenizer read once, each schema compiled once (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, schema=None, strict: bool = True, wrap: tuple[str, str] | None = None):
        """The compiled grammar of `schema` (a dict or JSON text), or of any JSON object when None. `strict`:
        objects hold only the properties the schema names (OpenAI's strict mode); otherwise others may follow
        where the schema does not forbid them. `wrap`: fixed text before and after the JSON (a tool call's tags)."""
        if schema is None:
            text, strict = '{"type":"object"}', False
        else:
            text = json.dumps(_plain_strings(json.loads(schema_text(schema))), separators=(",", ":"))
        key = (text, strict, wrap)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiler = self.compiler
        try:
            if wrap is None:
                compiled = compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict)
            else:
                xgr = _xgrammar()
                body = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=strict)
                before, after = (xgr.Grammar.from_ebnf(f"root ::= {json.dumps(part)}") for part in wrap)
                compiled = compiler.compile_grammar(xgr.Grammar.concat(before, body, after))
        except (RuntimeError, ValueError) as exc:
            raise SchemaError(f"the JSON schema cannot be used: {_library_message(exc)}") from None
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return compiled

    def constraint(self, schema=None, strict: bool = True, wrap: tuple[str, str] | None = None) -> JsonConstraint:
        """A fresh row state for `schema` (see compile)."""
        return JsonConstraint(self.compile(schema, strict, wrap))


def _library_message(exc: Exception) -> str:
    """xgrammar's message without its log prefix ("[07:04:40] /project/cpp/x.cc:49: ")."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", line)
