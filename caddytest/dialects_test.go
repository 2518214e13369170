package caddytest

import (
	"net/http"
	"strings"
	"testing"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// dialectCase is one API dialect's request, refused on its second sending.
type dialectCase struct {
	name, path, body string
	hdr              []string
	rule             string
	// check decodes the 429 body and returns its message.
	check func(t *testing.T, r response) string
}

func anthropicMessage(t *testing.T, r response) string {
	var e struct {
		Type  string `json:"type"`
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	decodeStrict(t, "anthropic", r.body, &e)
	if e.Type != "error" || e.Error.Type != "rate_limit_error" {
		t.Errorf("anthropic: type %q error.type %q, want error, rate_limit_error", e.Type, e.Error.Type)
	}
	return e.Error.Message
}

func geminiMessage(t *testing.T, r response, code int, status string) string {
	var e struct {
		Error struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
			Status  string `json:"status"`
		} `json:"error"`
	}
	decodeStrict(t, "gemini", r.body, &e)
	if e.Error.Code != code || e.Error.Status != status {
		t.Errorf("gemini: code %d status %q, want %d %s", e.Error.Code, e.Error.Status, code, status)
	}
	return e.Error.Message
}

func ollamaMessage(t *testing.T, r response) string {
	var e map[string]any
	decodeStrict(t, "ollama", r.body, &e)
	msg, ok := e["error"].(string)
	if !ok || len(e) != 1 {
		t.Errorf("ollama: body %s, want exactly {\"error\": string}", r.body)
	}
	return msg
}

func openAIMessage(t *testing.T, r response) string {
	var e openAIError
	decodeStrict(t, "openai", r.body, &e)
	if e.Error.Code != "rate_limit_exceeded" || e.Error.Type != "requests" || e.Error.Param != nil {
		t.Errorf("openai: code %q type %q param %v, want rate_limit_exceeded, requests, null", e.Error.Code, e.Error.Type, e.Error.Param)
	}
	return e.Error.Message
}

// The 429 is shaped like the caller's API, names the rule and unit, never
// echoes the API key, and says when to retry. Each dialect's model comes
// from where that API puts it (Azure: the deployment; Gemini: the path).
func TestRefusalShapePerDialect(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		virtualaccount {http.request.header.Authorization}
		rule oa {
			when {
				models gpt-4o
			}
			limit 1 requests_per_day
		}
		rule az {
			when {
				models my-deployment
			}
			limit 1 requests_per_day
		}
		rule an {
			when {
				models claude-3-5-sonnet
			}
			limit 1 requests_per_day
		}
		rule ge {
			when {
				models gemini-1.5-flash
			}
			limit 1 requests_per_day
			applies_per virtualaccount
		}
		rule ol {
			when {
				models llama3
			}
			limit 1 requests_per_day
		}`, up)

	const key = "sk-SECRET-0123456789abcdef"
	cases := []dialectCase{
		{
			name: "openai", path: "/v1/chat/completions", body: chatBody("gpt-4o"),
			hdr: []string{"Authorization", "Bearer " + key}, rule: "oa", check: openAIMessage,
		},
		{
			// The body names another model: Azure's model is the deployment.
			name: "azure", path: "/openai/deployments/my-deployment/chat/completions?api-version=2024-06-01",
			body: chatBody("gpt-4o"), hdr: []string{"api-key", key, "Authorization", "Bearer " + key}, rule: "az",
			check: openAIMessage,
		},
		{
			name: "anthropic", path: "/v1/messages",
			body: `{"model":"claude-3-5-sonnet","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}`,
			hdr:  []string{"x-api-key", key, "anthropic-version", "2023-06-01", "Authorization", key}, rule: "an",
			check: anthropicMessage,
		},
		{
			name: "gemini", path: "/v1beta/models/gemini-1.5-flash:generateContent?key=" + key,
			body: `{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}`,
			hdr:  []string{"x-goog-api-key", key, "Authorization", "Bearer " + key}, rule: "ge",
			check: func(t *testing.T, r response) string { return geminiMessage(t, r, 429, "RESOURCE_EXHAUSTED") },
		},
		{
			name: "ollama", path: "/api/chat",
			body: `{"model":"llama3","stream":false,"messages":[{"role":"user","content":"hi"}]}`,
			hdr:  []string{"Authorization", "Bearer " + key}, rule: "ol", check: ollamaMessage,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(up.Requests())
			first := h.post(c.path, c.body, c.hdr...)
			wantStatus(t, c.name+" first", first, http.StatusOK)
			wantRemaining(t, c.name+" first", first, map[string]int64{c.rule + "/requests_per_day": 0})

			r := h.post(c.path, c.body, c.hdr...)
			wantStatus(t, c.name+" second", r, http.StatusTooManyRequests)
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			msg := c.check(t, r)
			wantRuleMessage(t, c.name, msg, c.rule, "requests_per_day")
			secs, _ := wantRetryAfter(t, c.name, r)
			if secs > 86400 {
				t.Errorf("Retry-After %d is longer than the rule's day", secs)
			}
			wantRemaining(t, c.name+" second", r, map[string]int64{c.rule + "/requests_per_day": 0})
			if strings.Contains(string(r.body), "SECRET") {
				t.Errorf("429 body leaks the API key: %s", r.body)
			}
			for name, vals := range r.header {
				if strings.Contains(strings.Join(vals, " "), "SECRET") {
					t.Errorf("429 header %s leaks the API key: %q", name, vals)
				}
			}
			// Only the first got to the upstream, byte for byte.
			got := requestsSince(up, before)
			if len(got) != 1 || got[0].BodySHA256 != sha([]byte(c.body)) {
				t.Fatalf("upstream saw %d requests (want 1 with the sent body)", len(got))
			}
		})
	}
}
