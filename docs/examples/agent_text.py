"""turnflow from LiveKit Agents, in text: an AgentSession whose LLM is TurnflowLLM (run from the repository root)."""

import asyncio

from livekit.agents import Agent, AgentSession

from turnflow.livekit import TurnflowLLM


async def main() -> None:
    model = TurnflowLLM("recipes/voice-chat.yaml", persona="maya")
    async with model, AgentSession(llm=model) as session:
        await session.start(Agent(instructions="Answer in one short sentence."))
        for question in ("What's on the board?", "Anything blocked?", "Who owns the release?"):
            result = await session.run(user_input=question)
            reply = [e.item for e in result.events if e.type == "message"][-1]
            llm = model.last_report["llm"]
            print(f"maya: {reply.text_content!r}")
            print(f"  prompt {llm['prompt_tokens']} tokens, processed {llm['prompt_tokens_processed']}")


asyncio.run(main())
