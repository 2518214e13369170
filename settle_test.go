package llmratelimit

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// respond is a next handler that answers with a fixed status, content type
// and body, written in the given pieces.
type respond struct {
	status int
	ctype  string
	pieces []string
}

func (rs respond) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", rs.ctype)
	w.WriteHeader(rs.status)
	for _, p := range rs.pieces {
		if _, err := w.Write([]byte(p)); err != nil {
			return err
		}
	}
	return nil
}

func tokenHandler(t *testing.T, tc *TokenConfig) *Handler {
	h := &Handler{Tokens: tc, Rules: []Rule{{ID: "tpm", Limits: []Limit{{LimitTo: 10000, Unit: "tokens_per_minute"}}}}}
	newTestHandler(t, h)
	return h
}

// remaining peeks at the tpm bucket through a request with an empty body on
// an unknown path, which charges no tokens.
func remaining(t *testing.T, h *Handler) string {
	t.Helper()
	w := serve(t, h, &upstream{}, "/v1/models", "")
	return w.Header().Get("RateLimit")
}

// chatBody's prompt is "hello": 5 characters, 2 tokens; with no max_tokens
// the completion estimate is 1024. So every chat request charges 1026.
func TestSettleOnReportedUsage(t *testing.T) {
	for _, tc := range []struct {
		name, path, body string
		next             respond
		want             string
	}{
		{"openai json", "/v1/chat/completions", chatBody, respond{200, "application/json",
			[]string{`{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":20,"completion_tokens":30,"total_tokens":50}}`}},
			`"tpm/tokens_per_minute";r=9950;t=1`},
		{"openai stream with usage", "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello"}]}`,
			respond{200, "text/event-stream", []string{
				"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
				"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
				"data: [DONE]\n\n"}},
			`"tpm/tokens_per_minute";r=9990;t=1`},
		{"stream without usage counts the text", "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello"}]}`,
			respond{200, "text/event-stream", []string{
				"data: {\"choices\":[{\"delta\":{\"content\":\"" + strings.Repeat("x", 40) + "\"}}]}\n\n", "data: [DONE]\n\n"}},
			// prompt estimate 2 + 40 characters / 4 = 12
			`"tpm/tokens_per_minute";r=9988;t=1`},
		{"upstream error refunds the completion", "/v1/chat/completions", chatBody,
			respond{500, "application/json", []string{`{"error":{"message":"boom"}}`}},
			`"tpm/tokens_per_minute";r=9998;t=1`},
		{"anthropic with cache", "/v1/messages", `{"model":"claude","max_tokens":100,"messages":[{"role":"user","content":"hello"}]}`,
			respond{200, "application/json", []string{`{"type":"message","usage":{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":100,"cache_creation_input_tokens":0}}`}},
			`"tpm/tokens_per_minute";r=9885;t=1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := tokenHandler(t, nil)
			serve(t, h, tc.next, tc.path, tc.body)
			if got := remaining(t, h); got != tc.want {
				t.Fatalf("after settlement: %q, want %q", got, tc.want)
			}
		})
	}
}

func TestTokenChargeAtAdmission(t *testing.T) {
	h := tokenHandler(t, &TokenConfig{CompletionTokens: 100, Models: []ModelTokenConfig{{Match: "gpt-4o*", CharsPerToken: 1}}})
	// gpt-4o: 5 characters at 1 per token, plus 100.
	w := serve(t, h, respond{500, "application/json", nil}, "/v1/chat/completions", chatBody)
	if got := w.Header().Get("RateLimit"); got != `"tpm/tokens_per_minute";r=9895;t=1` {
		t.Fatalf("at admission: %q", got)
	}
	// The upstream failed: the completion was refunded, 5 are left. Now
	// max_tokens × n names the completion: 2 + 600.
	w = serve(t, h, respond{500, "application/json", nil}, "/v1/chat/completions", `{"model":"o","max_tokens":300,"n":2,"messages":[{"role":"user","content":"hello"}]}`)
	if got := w.Header().Get("RateLimit"); got != `"tpm/tokens_per_minute";r=9393;t=4` {
		t.Fatalf("at admission: %q", got)
	}
}

func TestOversize(t *testing.T) {
	big := `{"model":"o","max_tokens":20000,"messages":[{"role":"user","content":"hello"}]}`
	h := tokenHandler(t, &TokenConfig{Oversize: "reject"})
	w := serve(t, h, &upstream{}, "/v1/chat/completions", big)
	if w.Code != http.StatusRequestEntityTooLarge || !strings.Contains(w.Body.String(), `rule \"tpm\" allows at most 10000 at once`) {
		t.Fatalf("reject: %d %s", w.Code, w.Body)
	}
	h = tokenHandler(t, nil)
	up := &upstream{}
	if w := serve(t, h, up, "/v1/chat/completions", big); w.Code != 200 {
		t.Fatalf("admit on a full bucket: %d", w.Code)
	}
	// It left a debt: the next request waits for the bucket to drain.
	if w := serve(t, h, up, "/v1/chat/completions", chatBody); w.Code != 429 {
		t.Fatalf("after the debt: %d", w.Code)
	}
}

func TestStreamUsageAddsIncludeUsage(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"model":"m","stream":true}`, `{"stream_options":{"include_usage":true},"model":"m","stream":true}`},
		{` { "stream":true}`, ` {"stream_options":{"include_usage":true}, "stream":true}`},
		{`{}`, `{"stream_options":{"include_usage":true}}`},
	} {
		if got := string(addIncludeUsage([]byte(tc.in))); got != tc.want {
			t.Errorf("addIncludeUsage(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

// A client's huge max_tokens cannot push a debt onto everyone sharing the
// bucket: the charge is capped at the capacity, and settlement charges what
// was really used.
func TestHugeMaxTokensChargesAtMostCapacity(t *testing.T) {
	h := tokenHandler(t, nil)
	usage := respond{200, "application/json", []string{`{"usage":{"prompt_tokens":10,"completion_tokens":20}}`}}
	w := serve(t, h, usage, "/v1/chat/completions", `{"model":"m","max_tokens":1000000000000,"messages":[{"role":"user","content":"hi"}]}`)
	if w.Code != 200 || w.Header().Get("RateLimit") != `"tpm/tokens_per_minute";r=0;t=60` {
		t.Fatalf("admission: %d %q", w.Code, w.Header().Get("RateLimit"))
	}
	if got := remaining(t, h); got != `"tpm/tokens_per_minute";r=9970;t=1` {
		t.Fatalf("after settlement: %q", got)
	}
}

// A shadow rule never refuses, not even as oversize.
func TestOversizeRejectIgnoresShadowRules(t *testing.T) {
	h := &Handler{Tokens: &TokenConfig{Oversize: "reject"}, Rules: []Rule{{ID: "s", Mode: "shadow", Limits: []Limit{{LimitTo: 100, Unit: "tokens_per_minute"}}}}}
	newTestHandler(t, h)
	if w := serve(t, h, &upstream{}, "/v1/chat/completions", `{"model":"m","max_tokens":5000,"messages":[]}`); w.Code != 200 {
		t.Fatalf("shadow rule refused: %d %s", w.Code, w.Body)
	}
}

// drain reads the body and fails, like an upstream that could not be
// reached after the body was sent.
type drain struct{ got *[]byte }

func (d drain) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	*d.got, _ = io.ReadAll(r.Body)
	return caddyhttp.Error(http.StatusBadGateway, io.ErrUnexpectedEOF)
}

// After the handler, the request still carries its whole body, for
// handle_errors routes that send it to a fallback upstream.
func TestBodyLeftForHandleErrors(t *testing.T) {
	h := &Handler{Rules: []Rule{{ID: "r", Limits: []Limit{{LimitTo: 10, Unit: "requests_per_minute"}}}}}
	newTestHandler(t, h)
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(chatBody))
	caddyhttp.NewTestReplacer(r)
	var first []byte
	if err := h.ServeHTTP(httptest.NewRecorder(), r, drain{&first}); err == nil {
		t.Fatal("the error was lost")
	}
	again, _ := io.ReadAll(r.Body)
	if string(first) != chatBody || string(again) != chatBody {
		t.Fatalf("first read %q, second %q", first, again)
	}
}
