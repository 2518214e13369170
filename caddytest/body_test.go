package caddytest

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// The module reads recognised bodies to find the model; the upstream must
// still get every byte unchanged, whatever the body and however it was
// framed.
func TestBodyForwardedByteForByte(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		rule all {
			limit 1000 requests_per_hour
		}`, up)

	rng := rand.New(rand.NewPCG(1, 2))
	// ~1 MB of prompt text: printable ASCII and some multi-byte runes.
	var big strings.Builder
	alphabet := []rune("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;éßø世界🚀")
	for big.Len() < 1<<20 {
		big.WriteRune(alphabet[rng.IntN(len(alphabet))])
	}
	bigBody, _ := json.Marshal(map[string]any{
		"model":    "gpt-4o",
		"messages": []map[string]string{{"role": "user", "content": big.String()}},
	})
	binary := make([]byte, 300<<10)
	for i := range binary {
		binary[i] = byte(rng.Uint32())
	}

	// Unicode as raw UTF-8 and as escapes, raw U+2028, odd whitespace and a
	// duplicate key: nothing may be normalised on the way.
	unicodeBody := "{ \"model\" : \"gpt-4o\",\n\t\"messages\":[{\"role\":\"user\",\"content\":\"h\u00e9llo \u4e16\u754c \U0001F680 \u2028 \\u00e9\\ud83d\\ude80 \\\"q\\\" \\\\ \"}],\n\"model\":\"gpt-4o\" }  \r\n"

	cases := []struct {
		name    string
		path    string
		body    []byte
		chunked bool
		status  int
		ct      string
	}{
		{"unicode json", "/v1/chat/completions", []byte(unicodeBody), false, 200, "application/json"},
		{"1MB json", "/v1/chat/completions", bigBody, false, 200, "application/json"},
		{"1MB json chunked", "/v1/chat/completions", bigBody, true, 200, "application/json"},
		{"unicode anthropic chunked", "/v1/messages", []byte(`{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"ünïcødé ✓"}]}`), true, 200, "application/json"},
		{"binary on unknown path", "/v1/files/upload", binary, false, 404, "application/octet-stream"},
		{"binary on unknown path chunked", "/uploads/blob", binary, true, 404, "application/octet-stream"},
		{"empty body", "/v1/chat/completions", nil, false, 400, "application/json"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(up.Requests())
			var r response
			if c.chunked {
				r = h.postChunked(c.path, c.body, "Content-Type", c.ct)
			} else {
				r = h.post(c.path, string(c.body), "Content-Type", c.ct)
			}
			// 400 for the empty body is the upstream's: the module lets an
			// empty body through.
			wantStatus(t, c.name, r, c.status)
			_ = remaining(t, r, "all/requests_per_hour") // the rule applied
			got := requestsSince(up, before)
			if len(got) != 1 {
				t.Fatalf("upstream saw %d requests, want 1", len(got))
			}
			if got[0].BodyLen != len(c.body) || got[0].BodySHA256 != sha(c.body) {
				t.Errorf("upstream got %d bytes sha256 %s, want %d bytes sha256 %s",
					got[0].BodyLen, got[0].BodySHA256, len(c.body), sha(c.body))
			}
			if got[0].Path != c.path {
				t.Errorf("upstream path %q, want %q", got[0].Path, c.path)
			}
			if ct := got[0].Header.Get("Content-Type"); ct != c.ct {
				t.Errorf("upstream Content-Type %q, want %q", ct, c.ct)
			}
		})
	}
}
