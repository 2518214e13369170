package fakellm

import (
	"net/http"
	"strconv"
	"time"
)

// anthropic is the Anthropic Messages API dialect.
type anthropic struct{}

// writeError renders {"type":"error","error":{"type","message"}}.
func (anthropic) writeError(w http.ResponseWriter, e apiError) {
	typ := "invalid_request_error"
	switch e.status {
	case http.StatusNotFound:
		typ = "not_found_error"
	case http.StatusTooManyRequests:
		typ = "rate_limit_error"
	case http.StatusServiceUnavailable:
		typ = "overloaded_error"
	}
	writeJSON(w, e.status, obj{
		"type":  "error",
		"error": obj{"type": typ, "message": e.message},
	})
}

// setRateLimitHeaders sets anthropic-ratelimit-{requests,tokens}-{limit,
// remaining,reset}, reset being the RFC 3339 time the bucket is full.
func (anthropic) setRateLimitHeaders(h http.Header, s snapshot) {
	for _, d := range s.dimensions() {
		kind, st := d.kind, d.state
		p := "anthropic-ratelimit-" + kind + "-"
		h.Set(p+"limit", strconv.Itoa(st.limit))
		h.Set(p+"remaining", strconv.Itoa(st.remaining))
		// Rounded up to the second so the reset is never in the past.
		h.Set(p+"reset", s.now.Add(st.reset).Add(time.Second-1).Truncate(time.Second).UTC().Format(time.RFC3339))
	}
}

// anthropicMessages serves /v1/messages.
func anthropicMessages(c *call) {
	id := c.s.nextID("msg_fake")
	usage := func(output int) obj {
		return obj{
			"input_tokens":                c.promptTokens,
			"output_tokens":               output,
			"cache_creation_input_tokens": 0,
			"cache_read_input_tokens":     0,
		}
	}
	message := func(content []obj, stop any, u obj) obj {
		return obj{
			"id":            id,
			"type":          "message",
			"role":          "assistant",
			"model":         c.model,
			"content":       content,
			"stop_reason":   stop,
			"stop_sequence": nil,
			"usage":         u,
		}
	}
	if !c.boolField("stream", false) {
		writeJSON(c.w, http.StatusOK, message(
			[]obj{{"type": "text", "text": c.text()}}, "end_turn", usage(c.completionTokens)))
		return
	}

	st := c.startStream("text/event-stream")
	event := func(name string, data obj) error {
		data["type"] = name
		return st.sse(name, data)
	}
	if event("message_start", obj{"message": message([]obj{}, nil, usage(1))}) != nil ||
		event("content_block_start", obj{"index": 0, "content_block": obj{"type": "text", "text": ""}}) != nil {
		return
	}
	err := st.chunked(func(i int) error {
		return event("content_block_delta", obj{
			"index": 0,
			"delta": obj{"type": "text_delta", "text": c.piece(i)},
		})
	})
	if err != nil ||
		event("content_block_stop", obj{"index": 0}) != nil ||
		event("message_delta", obj{
			"delta": obj{"stop_reason": "end_turn", "stop_sequence": nil},
			"usage": obj{"output_tokens": c.completionTokens},
		}) != nil {
		return
	}
	_ = event("message_stop", obj{})
}
