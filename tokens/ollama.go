package tokens

import (
	"strings"

	"github.com/valyala/fastjson"
)

// routeOllama matches Ollama's native API by suffix. It runs before the
// OpenAI rules because /api/embeddings also ends in /embeddings.
func routeOllama(path string) (Dialect, Endpoint) {
	switch {
	case strings.HasSuffix(path, "/api/chat"):
		return DialectOllama, EndpointChat
	case strings.HasSuffix(path, "/api/generate"):
		return DialectOllama, EndpointGenerate
	case strings.HasSuffix(path, "/api/embed"), strings.HasSuffix(path, "/api/embeddings"):
		return DialectOllama, EndpointEmbedding
	}
	return DialectUnknown, EndpointUnknown
}

// parseOllama reads a native Ollama body. It returns the body's model,
// which borrows the parser's buffer.
//
// Chat and generate stream unless "stream" is false: that is Ollama's
// documented default, and Ollama decodes "stream" into a *bool, so null
// means "not set" and streams too.
func (p *Parser) parseOllama(ep Endpoint, root *fastjson.Value, useBodyModel bool, req *Request) (model []byte, err error) {
	var (
		options, messages, prompt, system, suffix, input, context *fastjson.Value
		stream, hasStream                                         bool
	)
	generates := ep == EndpointChat || ep == EndpointGenerate
	root.GetObject().Visit(func(k []byte, v *fastjson.Value) {
		if err != nil {
			return
		}
		switch string(k) {
		case "model":
			if useBodyModel {
				model, err = stringField(v, "model")
			}
		case "stream":
			if generates {
				stream, hasStream, err = boolField(v, "stream")
			}
		case "options":
			if generates {
				options, err = objectField(v, "options")
			}
		case "messages":
			messages = v
		case "prompt":
			prompt = v
		case "system":
			system = v
		case "suffix":
			suffix = v
		case "input":
			input = v
		case "context":
			context = v
		}
	})
	if err != nil {
		return nil, err
	}
	if generates {
		req.Stream = stream || !hasStream
	}
	visit(options, func(k []byte, v *fastjson.Value) {
		if err == nil && string(k) == "num_predict" {
			// -1 (and -2, "fill the context") mean no fixed cap: report
			// none and let the estimator choose.
			req.MaxOutputTokens, _, err = p.intField(v, "options.num_predict", false, true)
		}
	})
	if err != nil {
		return nil, err
	}

	switch ep {
	case EndpointChat:
		for _, m := range array(messages) {
			var content, toolCalls *fastjson.Value
			visit(m, func(k []byte, v *fastjson.Value) {
				switch string(k) {
				case "content":
					content = v
				case "tool_calls":
					toolCalls = v
				}
			})
			addString(req, content)
			for _, tc := range array(toolCalls) {
				p.addJSON(req, last(last(tc, "function"), "arguments"))
			}
		}
	case EndpointGenerate:
		addString(req, system)
		addString(req, prompt)
		addString(req, suffix)
		// context is the token ids of the previous exchange, fed back in.
		if c := array(context); c != nil {
			req.PromptChars += charsPerTokenID * int64(len(c))
		}
	case EndpointEmbedding:
		// /api/embed takes input; the older /api/embeddings takes prompt.
		addStringsOrIDs(req, input)
		addString(req, prompt)
	}
	return model, nil
}
