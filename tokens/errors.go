package tokens

import (
	"net/http"
	"strconv"
	"sync"
	"unicode/utf8"
)

// ErrorKind says why a request is refused; WriteError maps it onto each
// dialect's error vocabulary so that SDKs classify it correctly (retry on
// rate limits, fail fast on bad requests).
type ErrorKind uint8

// The kinds of refusal.
const (
	// ErrRateLimited is a limit hit; SDKs retry it after Retry-After.
	ErrRateLimited ErrorKind = iota
	// ErrTooLarge is a request that can never fit a limit or a size cap.
	ErrTooLarge
	// ErrBadRequest is a body the module could not read (a *ParseError).
	ErrBadRequest
	// ErrUnavailable is the gateway unable to decide (its shared store is
	// down and fails closed); SDKs retry it like a provider's 503.
	ErrUnavailable
)

// errBufPool recycles response buffers: under a flood every refused request
// writes one, so the refusal path must stay cheap.
var errBufPool = sync.Pool{New: func() any { b := make([]byte, 0, 256); return &b }}

// WriteError writes a JSON error in the dialect's shape with the given HTTP
// status and Content-Type: application/json. It does not touch other
// headers (the caller sets Retry-After etc. first). unit is "requests" or
// "tokens" (used for OpenAI's error "type" on a 429; may be ""). message is
// JSON-escaped, so it may hold any text.
//
// OpenAI, Azure and DialectUnknown share OpenAI's shape, since clients of an
// unrecognised API most likely speak OpenAI's.
func WriteError(w http.ResponseWriter, d Dialect, status int, kind ErrorKind, unit, message string) {
	bp := errBufPool.Get().(*[]byte)
	b := appendError((*bp)[:0], d, status, kind, unit, message)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b) // the client may be gone; nothing useful to do
	if cap(b) <= 64<<10 {
		*bp = b
		errBufPool.Put(bp)
	}
}

// appendError appends the body WriteError sends.
func appendError(b []byte, d Dialect, status int, kind ErrorKind, unit, message string) []byte {
	switch d {
	case DialectAnthropic:
		typ := "invalid_request_error"
		switch kind {
		case ErrRateLimited:
			typ = "rate_limit_error"
		case ErrTooLarge:
			typ = "request_too_large"
		case ErrUnavailable:
			typ = "api_error"
		}
		b = append(b, `{"type":"error","error":{"type":`...)
		b = appendJSONString(b, typ)
		b = append(b, `,"message":`...)
		b = appendJSONString(b, message)
		return append(b, "}}"...)
	case DialectGemini:
		st := "INVALID_ARGUMENT"
		switch kind {
		case ErrRateLimited:
			st = "RESOURCE_EXHAUSTED"
		case ErrUnavailable:
			st = "UNAVAILABLE"
		}
		b = append(b, `{"error":{"code":`...)
		b = strconv.AppendInt(b, int64(status), 10)
		b = append(b, `,"message":`...)
		b = appendJSONString(b, message)
		b = append(b, `,"status":`...)
		b = appendJSONString(b, st)
		return append(b, "}}"...)
	case DialectOllama:
		b = append(b, `{"error":`...)
		b = appendJSONString(b, message)
		return append(b, '}')
	}
	typ, code := "invalid_request_error", "invalid_request"
	switch kind {
	case ErrRateLimited:
		typ, code = unit, "rate_limit_exceeded"
		if typ == "" {
			typ = "requests"
		}
	case ErrTooLarge:
		code = "request_too_large"
	case ErrUnavailable:
		typ, code = "server_error", "service_unavailable"
	}
	b = append(b, `{"error":{"message":`...)
	b = appendJSONString(b, message)
	b = append(b, `,"type":`...)
	b = appendJSONString(b, typ)
	b = append(b, `,"param":null,"code":`...)
	b = appendJSONString(b, code)
	return append(b, "}}"...)
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string with encoding/json's
// escaping: quotes, backslashes and control characters escaped, invalid
// UTF-8 replaced by U+FFFD, and U+2028/U+2029 escaped so the body is also
// safe inside JavaScript. Written by hand to avoid reflection and
// allocation on the refusal path.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
