package fakellm

import (
	"net/http"
	"time"
)

// ollama is the Ollama native API dialect.
type ollama struct{}

// writeError renders Ollama's bare {"error":"..."}.
func (ollama) writeError(w http.ResponseWriter, e apiError) {
	writeJSON(w, e.status, obj{"error": e.message})
}

// setRateLimitHeaders does nothing: Ollama has no rate limits of its own.
func (ollama) setRateLimitHeaders(http.Header, snapshot) {}

// fakeDuration is the nanosecond figure reported in Ollama's timing
// fields; only its presence matters.
const fakeDuration = int64(time.Millisecond)

// ollamaCompletion serves /api/chat and /api/generate, which differ only in
// the field that carries the text: content(s) builds it.
func ollamaCompletion(c *call, content func(text string) (string, any)) {
	createdAt := c.now.UTC().Format(time.RFC3339Nano)
	line := func(text string, done bool) obj {
		key, val := content(text)
		o := obj{"model": c.model, "created_at": createdAt, key: val, "done": done}
		if done {
			o["done_reason"] = "stop"
			o["total_duration"] = 3 * fakeDuration
			o["load_duration"] = fakeDuration
			o["prompt_eval_count"] = c.promptTokens
			o["prompt_eval_duration"] = fakeDuration
			o["eval_count"] = c.completionTokens
			o["eval_duration"] = fakeDuration
		}
		return o
	}
	// Unlike the other providers, Ollama streams unless told not to.
	if !c.boolField("stream", true) {
		writeJSON(c.w, http.StatusOK, line(c.text(), true))
		return
	}
	st := c.startStream("application/x-ndjson")
	if st.chunked(func(i int) error { return st.line(line(c.piece(i), false)) }) != nil {
		return
	}
	_ = st.line(line("", true))
}

// ollamaChat serves /api/chat.
func ollamaChat(c *call) {
	ollamaCompletion(c, func(text string) (string, any) {
		return "message", obj{"role": "assistant", "content": text}
	})
}

// ollamaGenerate serves /api/generate.
func ollamaGenerate(c *call) {
	ollamaCompletion(c, func(text string) (string, any) { return "response", text })
}

// ollamaEmbed serves /api/embed: one vector per input.
func ollamaEmbed(c *call) {
	inputs := embeddingInputs(c.body["input"])
	vecs := make([][]float64, len(inputs))
	for i, in := range inputs {
		vecs[i] = embedding(in)
	}
	writeJSON(c.w, http.StatusOK, obj{
		"model":             c.model,
		"embeddings":        vecs,
		"total_duration":    fakeDuration,
		"load_duration":     0,
		"prompt_eval_count": c.promptTokens,
	})
}
