package fakellm

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// gemini is the Google Gemini (Generative Language API) dialect.
type gemini struct{}

// geminiStatus maps HTTP statuses to google.rpc status names.
var geminiStatus = map[int]string{
	http.StatusBadRequest:         "INVALID_ARGUMENT",
	http.StatusNotFound:           "NOT_FOUND",
	http.StatusMethodNotAllowed:   "INVALID_ARGUMENT",
	http.StatusTooManyRequests:    "RESOURCE_EXHAUSTED",
	http.StatusServiceUnavailable: "UNAVAILABLE",
}

// writeError renders {"error":{"code","message","status"}}, with a
// RetryInfo detail on 429s as the real API sends, unless e.retryHint is
// off (Config.NoRetryAfter).
func (gemini) writeError(w http.ResponseWriter, e apiError) {
	body := obj{
		"code":    e.status,
		"message": e.message,
		"status":  geminiStatus[e.status],
	}
	if e.status == http.StatusTooManyRequests && e.retryHint {
		body["details"] = []obj{{
			"@type":      "type.googleapis.com/google.rpc.RetryInfo",
			"retryDelay": fmt.Sprintf("%ds", retrySeconds(e.retryAfter)),
		}}
	}
	writeJSON(w, e.status, obj{"error": body})
}

// setRateLimitHeaders does nothing: Gemini sends no rate-limit headers.
func (gemini) setRateLimitHeaders(http.Header, snapshot) {}

// geminiResponse is a GenerateContentResponse carrying text, with usage
// counting completion tokens so far.
func (c *call) geminiResponse(id, text string, completion int, finish bool) obj {
	cand := obj{
		"content": obj{"parts": []obj{{"text": text}}, "role": "model"},
		"index":   0,
	}
	if finish {
		cand["finishReason"] = "STOP"
	}
	return obj{
		"candidates": []obj{cand},
		"usageMetadata": obj{
			"promptTokenCount":     c.promptTokens,
			"candidatesTokenCount": completion,
			"totalTokenCount":      c.promptTokens + completion,
		},
		"modelVersion": c.model,
		"responseId":   id,
	}
}

// geminiGenerate serves models/{m}:generateContent.
func geminiGenerate(c *call) {
	writeJSON(c.w, http.StatusOK, c.geminiResponse(c.s.nextID("fake"), c.text(), c.completionTokens, true))
}

// geminiStream serves models/{m}:streamGenerateContent: SSE with alt=sse,
// otherwise one JSON array written an element at a time.
func geminiStream(c *call) {
	id := c.s.nextID("fake")
	chunk := func(i int) obj {
		return c.geminiResponse(id, c.piece(i), c.cumulativeCompletion(i), i == c.chunks()-1)
	}
	if c.r.URL.Query().Get("alt") == "sse" {
		st := c.startStream("text/event-stream")
		_ = st.chunked(func(i int) error { return st.sse("", chunk(i)) })
		return
	}
	st := c.startStream("application/json")
	err := st.chunked(func(i int) error {
		b, err := json.Marshal(chunk(i))
		if err != nil {
			return err
		}
		sep := ","
		if i == 0 {
			sep = "["
		}
		return st.raw(sep + string(b) + "\n")
	})
	if err != nil {
		return
	}
	_ = st.raw("]")
}
