package llmratelimit

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/valyala/fastjson"
)

// placeholder is a user, team or account option. The common form, a single
// request header placeholder, is read straight from the header; anything
// else goes through Caddy's replacer.
type placeholder struct {
	raw    string
	header string // set when raw is exactly {http.request.header.NAME}
}

func newPlaceholder(raw string) placeholder {
	p := placeholder{raw: raw}
	if name, ok := strings.CutPrefix(raw, "{http.request.header."); ok {
		if name, ok = strings.CutSuffix(name, "}"); ok && name != "" && !strings.ContainsAny(name, "{}") {
			p.header = name
		}
	}
	return p
}

func (p placeholder) value(r *http.Request, repl *caddy.Replacer) string {
	if p.header != "" {
		// Caddy joins repeated header fields with commas; so does this.
		if v := r.Header.Values(p.header); len(v) > 1 {
			return strings.Join(v, ",")
		} else if len(v) == 1 {
			return v[0]
		}
		return ""
	}
	if repl == nil {
		return ""
	}
	return repl.ReplaceAll(p.raw, "")
}

// identity is who is asking and about what: the values rules match on and
// split by.
type identity struct {
	user, team string
	// account is the virtual account's hash, never the raw value.
	account string
	model   string
	// metadata from the metadata header, in header order.
	metadata []metaPair
}

// metaPair is one metadata key and value.
type metaPair struct{ key, value string }

func (id *identity) reset() {
	md := id.metadata[:0]
	*id = identity{metadata: md}
}

// value returns the request's value for a dimension ("" when it has none).
func (id *identity) value(kind dimensionKind, metaKey string) string {
	switch kind {
	case dimUser:
		return id.user
	case dimTeam:
		return id.team
	case dimVirtualAccount:
		return id.account
	case dimModel:
		return id.model
	case dimMetadata:
		v, _ := id.meta(metaKey)
		return v
	}
	return ""
}

func (id *identity) meta(key string) (string, bool) {
	for _, p := range id.metadata {
		if p.key == key {
			return p.value, true
		}
	}
	return "", false
}

// hashAccount turns a virtual account value, typically an API key, into the
// form every other part of the module sees: the hex of the first 16 bytes of
// its SHA-256. A leading "Bearer " is dropped first, so that the same key
// sent as "Authorization: Bearer sk-…" or as "x-api-key: sk-…" is one account.
// 128 bits keep accidental collisions out of reach while keeping keys short.
func hashAccount(v string) string {
	v = strings.TrimSpace(v)
	if len(v) >= 6 && strings.EqualFold(v[:6], "bearer") && (len(v) == 6 || v[6] == ' ') {
		v = strings.TrimSpace(v[6:])
	}
	if v == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(v))
	return hex.EncodeToString(sum[:16])
}

// maxIdentityValue bounds a user or team value as the module keeps it.
const maxIdentityValue = 256

// boundedValue keeps a user or team value at most maxIdentityValue bytes, so
// that a hostile header cannot make bucket keys or logs arbitrarily large. A
// longer value is replaced by its hash, which keeps distinct values distinct.
func boundedValue(v string) string {
	if len(v) <= maxIdentityValue {
		return v
	}
	return "sha256:" + hashAccount(v)
}

// Bounds on the metadata header. A header past them is ignored, not refused:
// metadata refines which rules apply, and a client must not be able to turn a
// malformed header into an error or a cost.
const (
	maxMetadataHeader = 4096
	maxMetadataPairs  = 32
	maxMetadataValue  = 256
)

var metadataParsers fastjson.ParserPool

// parseMetadata reads a metadata header: a JSON object whose values are
// strings. It appends the pairs to dst. Values that are not strings, and keys
// or values that are too long, are skipped; a header that is too large, is
// not a JSON object, or nests too deeply yields no pairs and a reason for the
// debug log.
func parseMetadata(dst []metaPair, header string) ([]metaPair, string) {
	if header == "" {
		return dst, ""
	}
	if len(header) > maxMetadataHeader {
		return dst, "metadata header too large"
	}
	p := metadataParsers.Get()
	defer metadataParsers.Put(p)
	v, err := p.Parse(header)
	if err != nil {
		return dst, "metadata header is not valid JSON"
	}
	obj, err := v.Object()
	if err != nil {
		return dst, "metadata header is not a JSON object"
	}
	start := len(dst)
	obj.Visit(func(k []byte, v *fastjson.Value) {
		if len(dst)-start >= maxMetadataPairs || len(k) > maxMetadataValue || v.Type() != fastjson.TypeString {
			return
		}
		s := v.GetStringBytes()
		if len(s) > maxMetadataValue {
			return
		}
		dst = append(dst, metaPair{key: string(k), value: string(s)})
	})
	return dst, ""
}
