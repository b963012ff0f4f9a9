// nginx njs: the key that `hash $gptserve_prefix consistent;` routes on, so that requests sharing a prompt
// prefix reach the replica whose prefix cache already holds it.
//
// The key is the model plus the first PREFIX_CHARS characters of what the model reads first: the prompt
// (completions), the messages (chat: a conversation's later turns extend its earlier serialisation, so every
// turn of one conversation gets the same key), or the input (responses). Any other request (GET, a body that
// is not JSON, one too large to stay in memory) gets its own random key and so goes anywhere.

const PREFIX_CHARS = 256;

function promptText(body) {
    if (body.messages !== undefined) {
        return JSON.stringify(body.messages);
    }
    const prompt = body.prompt !== undefined ? body.prompt : body.input;
    if (typeof prompt === 'string') {
        return prompt;
    }
    if (Array.isArray(prompt) && typeof prompt[0] === 'string') {
        return prompt[0]; // a batch of prompts: route on the first
    }
    return prompt === undefined ? undefined : JSON.stringify(prompt); // token ids
}

function key(r) {
    let text;
    try {
        const body = JSON.parse(r.requestText);
        text = promptText(body);
        if (text !== undefined) {
            return String(body.model) + '\n' + text.slice(0, PREFIX_CHARS);
        }
    } catch (e) {
        // not JSON, or no body in memory: no affinity to keep
    }
    return r.variables.request_id;
}

export default { key };
