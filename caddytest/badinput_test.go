package caddytest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// wantOpenAIError checks an OpenAI-shaped error other than a 429.
func wantOpenAIError(t *testing.T, what string, r response, status int, code, msgPart string) {
	t.Helper()
	wantStatus(t, what, r, status)
	var e openAIError
	decodeStrict(t, what, r.body, &e)
	if e.Error.Code != code || e.Error.Type != "invalid_request_error" || !strings.Contains(e.Error.Message, msgPart) {
		t.Errorf("%s: error %+v, want code %q, type invalid_request_error, message containing %q", what, e.Error, code, msgPart)
	}
}

// Bad requests are answered, in the caller's dialect, and never reach the
// upstream or take Caddy down.
func TestBadInput(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	// Caddy refuses request headers over 16 KiB itself; raise that so that
	// the hostile metadata headers reach the module.
	h.extraGlobal = "\tservers {\n\t\tmax_header_size 1MB\n\t}\n"
	h.loadHandler(`
		user {http.request.header.X-User}
		metadata_header X-LLM-Metadata
		max_body 1KiB
		model gpt-4o {
			rpd 1000
		}
		rule per-project {
			when {
				metadata env=prod
			}
			limit 1000 requests_per_day
			applies_per metadata.project_id
		}
		rule everyone {
			limit 1000 requests_per_day
		}`, up)

	// notForwarded runs f and checks that the upstream saw nothing.
	notForwarded := func(t *testing.T, f func()) {
		t.Helper()
		before := len(up.Requests())
		f()
		if got := len(requestsSince(up, before)); got != 0 {
			t.Errorf("upstream saw %d requests, want none", got)
		}
	}
	// forwarded runs f and checks that the upstream saw exactly one request.
	forwarded := func(t *testing.T, f func()) fakellm.Received {
		t.Helper()
		before := len(up.Requests())
		f()
		got := requestsSince(up, before)
		if len(got) != 1 {
			t.Fatalf("upstream saw %d requests, want 1", len(got))
		}
		return got[0]
	}

	t.Run("malformed JSON", func(t *testing.T) {
		notForwarded(t, func() {
			wantOpenAIError(t, "openai", h.post("/v1/chat/completions", `{"model": gpt-4o}`), 400, "invalid_request", "invalid request body")
			r := h.post("/v1/messages", `{"model":"claude",,}`)
			wantStatus(t, "anthropic", r, 400)
			var e struct {
				Type  string `json:"type"`
				Error struct{ Type, Message string }
			}
			decodeStrict(t, "anthropic", r.body, &e)
			if e.Type != "error" || e.Error.Type != "invalid_request_error" || e.Error.Message == "" {
				t.Errorf("anthropic 400 body %s", r.body)
			}
			r = h.post("/v1beta/models/gemini-pro:generateContent", `[1,2`)
			wantStatus(t, "gemini", r, 400)
			if msg := geminiMessage(t, r, 400, "INVALID_ARGUMENT"); msg == "" {
				t.Error("gemini 400 without a message")
			}
			r = h.post("/api/generate", `{"model":"llama3","prompt":"x","stream":"yes"}`)
			wantStatus(t, "ollama wrong type", r, 400)
			if msg := ollamaMessage(t, r); !strings.Contains(msg, "stream") {
				t.Errorf("ollama 400 message %q does not name the field", msg)
			}
		})
	})

	t.Run("truncated JSON", func(t *testing.T) {
		notForwarded(t, func() {
			wantOpenAIError(t, "truncated", h.post("/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hel`), 400, "invalid_request", "invalid request body")
			wantOpenAIError(t, "truncated chunked", h.postChunked("/v1/chat/completions", []byte(`{"model":"gpt-4o","messages":[`)), 400, "invalid_request", "invalid request body")
		})
	})

	t.Run("body over max_body", func(t *testing.T) {
		pad := func(n int) string {
			// {"model":"gpt-4o","x":"aaaa…"} of exactly n bytes.
			const head, tail = `{"model":"gpt-4o","x":"`, `"}`
			return head + strings.Repeat("a", n-len(head)-len(tail)) + tail
		}
		const msg = "larger than the gateway's limit of 1024 bytes"
		for _, c := range []struct {
			name    string
			n       int
			chunked bool
		}{
			{"Content-Length 1025", 1025, false},
			{"Content-Length 8K", 8 << 10, false},
			{"chunked 1025", 1025, true},
			{"chunked 64K", 64 << 10, true},
		} {
			t.Run(c.name, func(t *testing.T) {
				var r response
				notForwarded(t, func() {
					if c.chunked {
						r = h.postChunked("/v1/chat/completions", []byte(pad(c.n)))
					} else {
						r = h.post("/v1/chat/completions", pad(c.n))
					}
				})
				wantOpenAIError(t, c.name, r, 413, "request_too_large", msg)
			})
		}
		t.Run("ollama chunked", func(t *testing.T) {
			var r response
			notForwarded(t, func() {
				r = h.postChunked("/api/chat", []byte(`{"model":"llama3","messages":[{"role":"user","content":"`+strings.Repeat("x", 2000)+`"}]}`))
			})
			wantStatus(t, "ollama chunked", r, 413)
			if m := ollamaMessage(t, r); !strings.Contains(m, msg) {
				t.Errorf("ollama 413 message %q", m)
			}
		})
		t.Run("anthropic", func(t *testing.T) {
			var r response
			notForwarded(t, func() {
				r = h.post("/v1/messages", `{"model":"claude","max_tokens":1,"messages":[{"role":"user","content":"`+strings.Repeat("x", 2000)+`"}]}`)
			})
			wantStatus(t, "anthropic", r, 413)
			var e struct {
				Type  string `json:"type"`
				Error struct{ Type string }
			}
			decodeStrict(t, "anthropic 413", r.body, &e)
			if e.Type != "error" || e.Error.Type != "request_too_large" {
				t.Errorf("anthropic 413 body %s", r.body)
			}
		})
		t.Run("exactly max_body", func(t *testing.T) {
			forwarded(t, func() { wantStatus(t, "1024 bytes", h.post("/v1/chat/completions", pad(1024)), 200) })
			forwarded(t, func() {
				wantStatus(t, "1024 bytes chunked", h.postChunked("/v1/chat/completions", []byte(pad(1024))), 200)
			})
		})
		t.Run("unknown path", func(t *testing.T) {
			// A body the module does not read is not its business.
			rec := forwarded(t, func() { wantStatus(t, "unknown path", h.post("/v1/files", strings.Repeat("z", 4096)), 404) })
			if rec.BodyLen != 4096 {
				t.Errorf("unknown path: upstream got %d bytes", rec.BodyLen)
			}
		})
	})

	t.Run("invalid UTF-8 model", func(t *testing.T) {
		// "gpt-4o\xff": valid JSON syntax, invalid UTF-8 in the string.
		body := "{\"model\":\"gpt-4o\xff\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
		var r response
		rec := forwarded(t, func() { r = h.post("/v1/chat/completions", body) })
		wantStatus(t, "invalid UTF-8", r, 200)
		if rec.BodySHA256 != sha([]byte(body)) {
			t.Error("body changed on the way")
		}
		// Only the catch-all rule applied: not the gpt-4o rule.
		st := parseState(t, r.header)
		if _, ok := st["model:gpt-4o/requests_per_day"]; ok || len(st) != 1 {
			t.Errorf("RateLimit %q: want only everyone/requests_per_day", r.header.Get("RateLimit"))
		}
	})

	t.Run("hostile metadata header", func(t *testing.T) {
		deep := strings.Repeat(`{"a":`, 10000) + `"x"` + strings.Repeat("}", 10000)
		deepSmall := `{"env":"prod","project_id":` + strings.Repeat("[", 1500) + strings.Repeat("]", 1500) + `}`
		for name, md := range map[string]string{
			"10 KB":                 `{"env":"prod","project_id":"` + strings.Repeat("p", 10<<10) + `"}`,
			"not JSON":              `env=prod; project_id=p1`,
			"not an object":         `["env","prod"]`,
			"10000 deep":            deep,
			"1500 deep under 4 KiB": deepSmall,
			"non-string values":     `{"env":true,"project_id":{"id":1},"n":5,"z":null}`,
			"invalid escapes":       `{"env":"pr\od"}`,
		} {
			t.Run(name, func(t *testing.T) {
				var r response
				forwarded(t, func() { r = h.chat("m", "X-LLM-Metadata", md) })
				wantStatus(t, name, r, 200)
				wantRemaining(t, name, r, map[string]int64{"everyone/requests_per_day": remaining(t, r, "everyone/requests_per_day")})
			})
		}
		// Control: a well-formed header does select the rule.
		r := h.chat("m", "X-LLM-Metadata", `{"env":"prod","project_id":"p1"}`)
		wantStatus(t, "control", r, 200)
		if _, ok := parseState(t, r.header)["per-project/requests_per_day"]; !ok {
			t.Errorf("control: per-project did not apply: %q", r.header.Get("RateLimit"))
		}
	})

	t.Run("client disconnects mid-body", func(t *testing.T) {
		addr := fmt.Sprintf("127.0.0.1:%d", h.port)
		// Content-Length is within max_body; the client sends less.
		head := "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
		notForwarded(t, func() {
			// Abrupt close after part of the body.
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(c, head+`{"model":"gpt-4o","messages":[{"role":"user","content":"`); err != nil {
				t.Fatal(err)
			}
			c.Close()

			// Half close: the server sees the body end early and answers.
			c, err = net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(c, head+`{"model":"gpt-4o"`); err != nil {
				t.Fatal(err)
			}
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			// Read everything the server sends until it closes, so that
			// anything after the first response shows up too.
			all, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("reading the answer to a truncated body: %v", err)
			}
			res, err := http.ReadResponse(bufio.NewReader(strings.NewReader(string(all))), nil)
			if err != nil {
				t.Fatalf("no answer to a truncated body: %v\n%s", err, all)
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			wantOpenAIError(t, "truncated body", response{status: res.StatusCode, header: res.Header, body: b}, 400, "invalid_request", "could not read the request body")
		})
		// Caddy is fine.
		forwarded(t, func() { wantStatus(t, "next request", h.chat("gpt-4o"), 200) })
	})

	t.Run("malformed chunked body", func(t *testing.T) {
		// The body cannot be read (a chunk size that is not hex), though the
		// client is still there to read the answer: one 400, nothing
		// forwarded.
		var all []byte
		notForwarded(t, func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", h.port), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"+
				"Transfer-Encoding: chunked\r\n\r\n11\r\n{\"model\":\"gpt-4o\"\r\nzz\r\n"); err != nil {
				t.Fatal(err)
			}
			// The server closes the connection: it cannot find the next
			// request in what follows.
			all, err = io.ReadAll(c)
			if err != nil {
				t.Fatalf("reading the answer: %v (got %q)", err, all)
			}
		})
		res, err := http.ReadResponse(bufio.NewReader(strings.NewReader(string(all))), nil)
		if err != nil {
			t.Fatalf("no answer to a malformed chunked body: %v\n%s", err, all)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		wantOpenAIError(t, "malformed chunked body", response{status: res.StatusCode, header: res.Header, body: b}, 400, "invalid_request", "could not read the request body")
	})

	t.Run("unknown path and GET pass through", func(t *testing.T) {
		for _, c := range []struct {
			method, path, body string
			status             int
		}{
			{http.MethodGet, "/v1/models", "", 404},
			{http.MethodGet, "/v1/chat/completions", "", 405},
			{http.MethodPost, "/v2/whatever", `{"model":"gpt-4o"}`, 404},
			{http.MethodPut, "/v1/chat/completions", `{"model":"gpt-4o"}`, 405},
		} {
			var r response
			rec := forwarded(t, func() {
				var body io.Reader
				if c.body != "" {
					body = strings.NewReader(c.body)
				}
				r = h.do(h.newReq(c.method, c.path, body, "X-User", "alice"))
			})
			what := c.method + " " + c.path
			wantStatus(t, what, r, c.status)
			if rec.Method != c.method || rec.Path != c.path || rec.BodySHA256 != sha([]byte(c.body)) {
				t.Errorf("%s: upstream got %s %s with body sha %s", what, rec.Method, rec.Path, rec.BodySHA256)
			}
			// No model was read: only the catch-all rule applied.
			st := parseState(t, r.header)
			if _, ok := st["everyone/requests_per_day"]; !ok || len(st) != 1 {
				t.Errorf("%s: RateLimit %q, want only the catch-all rule", what, r.header.Get("RateLimit"))
			}
		}
	})
}

// With use_handle_errors, refusals go to handle_errors, and the rate-limit
// fields and Retry-After are still set.
func TestUseHandleErrors(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.load(fmt.Sprintf(`:%d {
	llm_rate_limit {
		use_handle_errors
		max_body 1KiB
		model gpt-4o {
			rpd 1
		}
	}
	reverse_proxy %s
	handle_errors {
		respond "handled {err.status_code}: {err.message}" {err.status_code}
	}
}
`, h.port, hostPort(up)))
	r := h.chat("gpt-4o")
	wantStatus(t, "first", r, http.StatusOK)
	r = h.chat("gpt-4o")
	wantStatus(t, "refused", r, http.StatusTooManyRequests)
	if !strings.HasPrefix(string(r.body), `handled 429: rate limit exceeded: rule "model:gpt-4o" allows 1 requests_per_day`) {
		t.Errorf("body %q, want handle_errors' answer", r.body)
	}
	wantRetryAfter(t, "refused", r)
	wantRemaining(t, "refused", r, map[string]int64{"model:gpt-4o/requests_per_day": 0})

	before := len(up.Requests())
	r = h.post("/v1/chat/completions", `{"model":"gpt-4o","x":"`+strings.Repeat("a", 2000)+`"}`)
	wantStatus(t, "too large", r, http.StatusRequestEntityTooLarge)
	if !strings.HasPrefix(string(r.body), "handled 413: request body is larger than the gateway's limit of 1024 bytes") {
		t.Errorf("body %q, want handle_errors' answer", r.body)
	}
	r = h.post("/v1/chat/completions", `{"model":`)
	wantStatus(t, "bad JSON", r, http.StatusBadRequest)
	if !strings.HasPrefix(string(r.body), "handled 400: invalid request body") {
		t.Errorf("body %q, want handle_errors' answer", r.body)
	}
	if got := len(requestsSince(up, before)); got != 0 {
		t.Errorf("upstream saw %d refused requests", got)
	}
}
