package tokens

import (
	"strings"

	"github.com/valyala/fastjson"
)

// routeOpenAI matches the OpenAI endpoints by suffix so that any mount
// point works (/v1/..., /openai/v1/..., /llm/v1/...). /responses must be
// the last segment: /v1/responses/{id} and its sub-resources read or
// cancel stored responses and generate nothing.
func routeOpenAI(path string) (Dialect, Endpoint) {
	switch {
	case strings.HasSuffix(path, "/chat/completions"):
		return DialectOpenAI, EndpointChat
	case strings.HasSuffix(path, "/completions"):
		return DialectOpenAI, EndpointCompletion
	case strings.HasSuffix(path, "/embeddings"):
		return DialectOpenAI, EndpointEmbedding
	case strings.HasSuffix(path, "/responses"):
		return DialectOpenAI, EndpointResponses
	}
	return DialectUnknown, EndpointUnknown
}

// parseOpenAI reads OpenAI-shaped bodies (also Azure's and, for the limit
// fields only, unrecognised endpoints). It returns the body's model, which
// borrows the parser's buffer.
func (p *Parser) parseOpenAI(ep Endpoint, root *fastjson.Value, useBodyModel bool, req *Request) (model []byte, err error) {
	var (
		maxTokens, maxCompletion, maxOutput int64
		hasMaxCompletion                    bool
		n, bestOf                           int64
		messages, prompt, suffix, input     *fastjson.Value
		instructions                        *fastjson.Value
	)
	generates := ep != EndpointEmbedding
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
				req.Stream, _, err = boolField(v, "stream")
			}
		case "max_tokens":
			if generates && ep != EndpointResponses {
				maxTokens, _, err = p.intField(v, "max_tokens", false, false)
			}
		case "max_completion_tokens":
			if generates && ep != EndpointResponses {
				maxCompletion, hasMaxCompletion, err = p.intField(v, "max_completion_tokens", false, false)
			}
		case "max_output_tokens":
			if ep == EndpointResponses {
				maxOutput, _, err = p.intField(v, "max_output_tokens", false, false)
			}
		case "n":
			if generates && ep != EndpointResponses {
				n, _, err = p.intField(v, "n", false, false)
			}
		case "best_of":
			if ep == EndpointCompletion {
				bestOf, _, err = p.intField(v, "best_of", false, false)
			}
		case "messages":
			messages = v
		case "prompt":
			prompt = v
		case "suffix":
			suffix = v
		case "input":
			input = v
		case "instructions":
			instructions = v
		case "stream_options":
			// Only its presence matters, for the stream_usage option: a
			// client that sent stream_options made its own choice.
			req.HasStreamOptions = v.Type() != fastjson.TypeNull
			if o, _ := v.Object(); o != nil {
				if iu := o.Get("include_usage"); iu != nil && iu.Type() == fastjson.TypeTrue {
					req.IncludeUsage = true
				}
			}
		}
	})
	if err != nil {
		return nil, err
	}
	switch ep {
	case EndpointResponses:
		req.MaxOutputTokens = maxOutput
	case EndpointEmbedding:
	default:
		// max_completion_tokens replaced max_tokens; when both are sent the
		// newer one is what the upstream honours.
		req.MaxOutputTokens = maxTokens
		if hasMaxCompletion {
			req.MaxOutputTokens = maxCompletion
		}
	}
	req.Choices = max(n, bestOf)

	switch ep {
	case EndpointChat:
		for _, m := range array(messages) {
			p.countOpenAIMessage(req, m)
		}
	case EndpointCompletion:
		addStringsOrIDs(req, prompt)
		addString(req, suffix)
	case EndpointEmbedding:
		addStringsOrIDs(req, input)
	case EndpointResponses:
		addString(req, instructions)
		countResponsesInput(req, input)
	}
	return model, nil
}

// countOpenAIMessage counts one chat message: its content and the
// arguments of the tool calls it carries (which the model reads back on the
// next turn).
func (p *Parser) countOpenAIMessage(req *Request, m *fastjson.Value) {
	var content, toolCalls, functionCall *fastjson.Value
	visit(m, func(k []byte, v *fastjson.Value) {
		switch string(k) {
		case "content":
			content = v
		case "tool_calls":
			toolCalls = v
		case "function_call":
			functionCall = v
		}
	})
	if content != nil {
		switch content.Type() {
		case fastjson.TypeString:
			addString(req, content)
		case fastjson.TypeArray:
			// Only text parts: image_url, input_audio and file parts carry
			// URLs or base64 that is not tokenised as text.
			for _, part := range content.GetArray() {
				var typ, text *fastjson.Value
				visit(part, func(k []byte, v *fastjson.Value) {
					switch string(k) {
					case "type":
						typ = v
					case "text":
						text = v
					}
				})
				if isString(typ, "text") {
					addString(req, text)
				}
			}
		}
	}
	for _, tc := range array(toolCalls) {
		p.addJSON(req, last(last(tc, "function"), "arguments"))
	}
	p.addJSON(req, last(functionCall, "arguments"))
}

// countResponsesInput counts the Responses API input: a string, or a list
// of items whose content is a string or a list of parts with text, plus
// the function calls and their outputs replayed in the list.
func countResponsesInput(req *Request, input *fastjson.Value) {
	if input == nil {
		return
	}
	if input.Type() == fastjson.TypeString {
		addString(req, input)
		return
	}
	for _, item := range array(input) {
		var content, arguments, output *fastjson.Value
		visit(item, func(k []byte, v *fastjson.Value) {
			switch string(k) {
			case "content":
				content = v
			case "arguments":
				arguments = v
			case "output":
				output = v
			}
		})
		addTextParts(req, content)
		addString(req, arguments)
		addTextParts(req, output)
	}
}

// addTextParts counts a string, or the "text" of each part in an array
// (input_text, output_text and the like; image and file parts have none).
func addTextParts(req *Request, v *fastjson.Value) {
	if v == nil {
		return
	}
	switch v.Type() {
	case fastjson.TypeString:
		addString(req, v)
	case fastjson.TypeArray:
		for _, part := range v.GetArray() {
			addString(req, last(part, "text"))
		}
	}
}
