package fakellm

import (
	"net/http"
	"strconv"
)

// openAI is the OpenAI dialect, also spoken by Azure OpenAI, whose paths
// differ but whose bodies and headers are the same.
type openAI struct{}

// writeError renders OpenAI's {"error":{message,type,param,code}}.
func (openAI) writeError(w http.ResponseWriter, e apiError) {
	typ, code := "invalid_request_error", any(nil)
	switch e.status {
	case http.StatusNotFound:
		code = "unknown_url"
	case http.StatusTooManyRequests:
		typ, code = e.limitType, "rate_limit_exceeded"
	case http.StatusServiceUnavailable:
		typ, code = "server_error", "overloaded"
	}
	writeJSON(w, e.status, obj{"error": obj{
		"message": e.message,
		"type":    typ,
		"param":   nil,
		"code":    code,
	}})
}

// setRateLimitHeaders sets x-ratelimit-{limit,remaining,reset}-{requests,tokens}.
func (openAI) setRateLimitHeaders(h http.Header, s snapshot) {
	for _, d := range s.dimensions() {
		kind, st := d.kind, d.state
		h.Set("x-ratelimit-limit-"+kind, strconv.Itoa(st.limit))
		h.Set("x-ratelimit-remaining-"+kind, strconv.Itoa(st.remaining))
		h.Set("x-ratelimit-reset-"+kind, formatReset(st.reset))
	}
}

// openAIUsage is the usage object of chat and legacy completions.
func (c *call) openAIUsage() obj {
	return obj{
		"prompt_tokens":     c.promptTokens,
		"completion_tokens": c.completionTokens,
		"total_tokens":      c.totalTokens(),
	}
}

// finishReason is "stop" on the last chunk and null before it.
func (c *call) finishReason(i int) any {
	if i == c.chunks()-1 {
		return "stop"
	}
	return nil
}

// openAIChat serves /v1/chat/completions.
func openAIChat(c *call) {
	id, created := c.s.nextID("chatcmpl-fake"), c.now.Unix()
	if !c.boolField("stream", false) {
		writeJSON(c.w, http.StatusOK, obj{
			"id":      id,
			"object":  "chat.completion",
			"created": created,
			"model":   c.model,
			"choices": []obj{{
				"index":         0,
				"message":       obj{"role": "assistant", "content": c.text(), "refusal": nil},
				"logprobs":      nil,
				"finish_reason": "stop",
			}},
			"usage": c.openAIUsage(),
		})
		return
	}
	c.openAIStream(func(i int) obj {
		delta := obj{"content": c.piece(i)}
		if i == 0 {
			delta["role"] = "assistant"
		}
		return obj{
			"id":      id,
			"object":  "chat.completion.chunk",
			"created": created,
			"model":   c.model,
			"choices": []obj{{
				"index":         0,
				"delta":         delta,
				"logprobs":      nil,
				"finish_reason": c.finishReason(i),
			}},
		}
	}, obj{"id": id, "object": "chat.completion.chunk", "created": created, "model": c.model})
}

// openAICompletions serves the legacy /v1/completions.
func openAICompletions(c *call) {
	id, created := c.s.nextID("cmpl-fake"), c.now.Unix()
	choice := func(text string, finish any) []obj {
		return []obj{{"text": text, "index": 0, "logprobs": nil, "finish_reason": finish}}
	}
	if !c.boolField("stream", false) {
		writeJSON(c.w, http.StatusOK, obj{
			"id":      id,
			"object":  "text_completion",
			"created": created,
			"model":   c.model,
			"choices": choice(c.text(), "stop"),
			"usage":   c.openAIUsage(),
		})
		return
	}
	c.openAIStream(func(i int) obj {
		return obj{
			"id":      id,
			"object":  "text_completion",
			"created": created,
			"model":   c.model,
			"choices": choice(c.piece(i), c.finishReason(i)),
		}
	}, obj{"id": id, "object": "text_completion", "created": created, "model": c.model})
}

// openAIStream sends chunk(i) for every content chunk, then, when the
// client asked for stream_options.include_usage, usageBase with empty
// choices and the usage, then [DONE]. As OpenAI does, content chunks carry
// "usage": null when a usage chunk will follow.
func (c *call) openAIStream(chunk func(i int) obj, usageBase obj) {
	withUsage := c.includeUsage()
	st := c.startStream("text/event-stream")
	err := st.chunked(func(i int) error {
		ev := chunk(i)
		if withUsage {
			ev["usage"] = nil
		}
		return st.sse("", ev)
	})
	if err != nil {
		return
	}
	if withUsage {
		usageBase["choices"] = []obj{}
		usageBase["usage"] = c.openAIUsage()
		if st.sse("", usageBase) != nil {
			return
		}
	}
	_ = st.raw("data: [DONE]\n\n")
}

// openAIEmbeddings serves /v1/embeddings: one short vector per input.
func openAIEmbeddings(c *call) {
	inputs := embeddingInputs(c.body["input"])
	data := make([]obj, len(inputs))
	for i, in := range inputs {
		data[i] = obj{"object": "embedding", "index": i, "embedding": embedding(in)}
	}
	writeJSON(c.w, http.StatusOK, obj{
		"object": "list",
		"data":   data,
		"model":  c.model,
		"usage":  obj{"prompt_tokens": c.promptTokens, "total_tokens": c.promptTokens},
	})
}

// openAIResponses serves /v1/responses, the Responses API.
func openAIResponses(c *call) {
	id, msgID := c.s.nextID("resp_fake"), c.s.nextID("msg_fake")
	response := func(status string, text string, usage any) obj {
		output := []obj{}
		if status == "completed" {
			output = []obj{{
				"type":   "message",
				"id":     msgID,
				"status": "completed",
				"role":   "assistant",
				"content": []obj{{
					"type":        "output_text",
					"text":        text,
					"annotations": []obj{},
				}},
			}}
		}
		return obj{
			"id":         id,
			"object":     "response",
			"created_at": c.now.Unix(),
			"status":     status,
			"model":      c.model,
			"output":     output,
			"usage":      usage,
		}
	}
	usage := obj{
		"input_tokens":  c.promptTokens,
		"output_tokens": c.completionTokens,
		"total_tokens":  c.totalTokens(),
	}
	if !c.boolField("stream", false) {
		writeJSON(c.w, http.StatusOK, response("completed", c.text(), usage))
		return
	}
	st := c.startStream("text/event-stream")
	seq := 0
	event := func(name string, data obj) error {
		data["type"] = name
		data["sequence_number"] = seq
		seq++
		return st.sse(name, data)
	}
	if event("response.created", obj{"response": response("in_progress", "", nil)}) != nil {
		return
	}
	err := st.chunked(func(i int) error {
		return event("response.output_text.delta", obj{
			"item_id":       msgID,
			"output_index":  0,
			"content_index": 0,
			"delta":         c.piece(i),
		})
	})
	if err != nil {
		return
	}
	_ = event("response.completed", obj{"response": response("completed", c.text(), usage)})
}
